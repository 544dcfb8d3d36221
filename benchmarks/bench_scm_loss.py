"""Benchmark cases of scm_kernels.scm_loss (A14-A17: the per-sample sCM loss
L = exp(-logvar)/D * ||F - F^- - g/(||g|| + c)||^2 + logvar, g from A14).

One case per dtype: B=64 samples of 3x64x64 (F, jvp_out, x_t, dxt_dt in the case's dtype; t and
logvar (B,) fp32; F_minus=None, i.e. F^- = F.detach()). Modes fwd, bwd, fwd+bwd (gradients w.r.t. F
and logvar), jvp (tangents of F and logvar).

Minimal bytes (N = elements of F, e = its element size, B = batch, per-sample values fp32):
  fwd      read F, J, x_t, dxt_dt, t, logvar             write loss           = 4*N*e + 8B + 4B
  bwd      read dL, F, J, x_t, dxt_dt, t, logvar          write dF, dlogvar    = 4*N*e + 12B + N*e + 4B
           (g must be recomputed from J, x_t, dxt_dt: they are inputs of the backward too)
  fwd+bwd  read F, J, x_t, dxt_dt, t, logvar, dL          write loss, dF, dlogvar
                                                                              = 4*N*e + 12B + N*e + 8B
  jvp      read F, J, x_t, dxt_dt, t, logvar, F', logvar' write loss, loss'    = 5*N*e + 16B + 8B
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import Case, Target, import_op, nbytes

OP = "scm_loss"
SIGMA_D = 0.5

TARGETS = [
    Target(f"{OP} fwd+bwd fp32: scm >= 3x eager", "default", "fwd+bwd", "fp32", "x_eager", 3.0),
]


def _inputs(shape, dtype):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        B = shape[0]

        def randn():
            return torch.randn(shape, generator=g, device=device).to(dtype)

        return {
            "F": randn(),
            "jvp_out": randn(),
            "x_t": randn().mul_(SIGMA_D),
            "dxt_dt": randn().mul_(SIGMA_D),
            "t": torch.rand(B, generator=g, device=device).mul_(math.pi / 2 - 0.1).add_(0.05),
            "logvar": torch.randn(B, generator=g, device=device).mul_(0.1),
        }

    return make


def _bytes(mode, i):
    F, t, lv = i["F"], i["t"], i["logvar"]
    big = nbytes(F, i["jvp_out"], i["x_t"], i["dxt_dt"])
    small = nbytes(t, lv)
    B = F.shape[0]
    if mode == "fwd":
        return big + small + 4 * B
    if mode == "bwd":
        return 4 * B + big + small + nbytes(F) + nbytes(lv)
    if mode == "fwd+bwd":
        return big + small + 4 * B + 4 * B + nbytes(F) + nbytes(lv)
    if mode == "jvp":
        return big + small + nbytes(F, lv) + 2 * 4 * B
    raise ValueError(mode)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    op, ref = import_op(OP)

    def scm(F, jvp_out, x_t, dxt_dt, t, logvar):
        return op(F, jvp_out, x_t, dxt_dt, t, logvar, sigma_d=SIGMA_D)

    def eager(F, jvp_out, x_t, dxt_dt, t, logvar):
        return ref(F, jvp_out, x_t, dxt_dt, t, logvar, sigma_d=SIGMA_D)

    shape = (64, 3, 64, 64)
    return [
        Case(
            op=OP,
            variant="default",
            shape=shape,
            dtype=dtype,
            modes=("fwd", "bwd", "fwd+bwd", "jvp"),
            make_inputs=_inputs(shape, dtype),
            scm=scm,
            reference=eager,
            bytes=_bytes,
            diff=("F", "logvar"),
            copy_like="F",
        )
        for dtype in (torch.float32, torch.bfloat16)
    ]
