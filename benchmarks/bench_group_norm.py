"""Benchmark cases of scm_kernels.group_norm (A28-A30: y = SiLU((GN(x) gamma + beta) s + b)).

Cases: the U-Net block of the issue, x (8, 256, 32, 32), G = 32, weight, bias (C,), scale = 1 + s,
shift (N, C), activation "silu", in fp32 (the CPU targets) and bf16, contiguous NCHW; and the same
fp32 block in channels_last (variant "channels_last"). Modes fwd, bwd (gradients w.r.t. x, weight,
bias, scale, shift), fwd+bwd, jvp (torch.func.jvp with tangents of all five = forward + JVP).

Minimal bytes (N_x = elements of x, e = its element size; per-channel operands fp32 or x's dtype):
  fwd      read x, weight, bias, scale, shift                      write y          = 2 N_x e + small
  bwd      read dy, x, weight, bias, scale, shift                  write dx, d(params) = 3 N_x e + 2 small
           (x is needed again: the statistics are saved, x^ is not)
  fwd+bwd  read x, params, dy                                      write y, dx, d(params)
  jvp      read x, x_dot, params, their tangents                   write y, y_dot   = 4 N_x e + 2 small
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Target, import_op, nbytes

OP = "group_norm"
G = 32

TARGETS = [
    Target(f"{OP} fwd fp32: scm >= 3x eager", "default", "fwd", "fp32", "x_eager", 3.0),
    Target(f"{OP} fwd+jvp fp32: scm >= 4x torch.func.jvp(eager)", "default", "jvp", "fp32", "x_eager", 4.0),
    Target(f"{OP} bwd fp32: scm >= 2x eager", "default", "bwd", "fp32", "x_eager", 2.0),
    Target(f"{OP} fwd fp32: scm >= 60% of copy bandwidth", "default", "fwd", "fp32", "copy_bw", 0.6),
]


def _inputs(shape, dtype, channels_last):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        N, C = shape[:2]
        x = torch.randn(shape, generator=g, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {
            "x": x,
            "weight": (1 + 0.1 * torch.randn(C, generator=g, device=device)).to(dtype),
            "bias": (0.1 * torch.randn(C, generator=g, device=device)).to(dtype),
            "scale": (1 + 0.2 * torch.randn(N, C, generator=g, device=device)).to(dtype),
            "shift": (0.2 * torch.randn(N, C, generator=g, device=device)).to(dtype),
        }

    return make


def _bytes(mode, i):
    x = i["x"]
    small = nbytes(i["weight"], i["bias"], i["scale"], i["shift"])
    if mode == "fwd":
        return 2 * nbytes(x) + small
    if mode == "bwd":
        return 3 * nbytes(x) + 2 * small
    if mode == "fwd+bwd":
        return 4 * nbytes(x) + 2 * small
    if mode == "jvp":
        return 4 * nbytes(x) + 2 * small
    raise ValueError(mode)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    op, ref = import_op(OP)

    def scm(x, weight, bias, scale, shift):
        return op(x, G, weight, bias, scale=scale, shift=shift, activation="silu")

    def eager(x, weight, bias, scale, shift):
        return ref(x, G, weight, bias, 1e-5, scale, shift, "silu")

    def eager_cl(x, weight, bias, scale, shift):
        # the composite on the channels_last tensor itself (F.group_norm has a channels_last CPU kernel)
        y = torch.nn.functional.group_norm(x, G, weight, bias, 1e-5)
        return torch.nn.functional.silu(y * scale[:, :, None, None] + shift[:, :, None, None])

    shape = (8, 256, 32, 32)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        out.append(Case(op=OP, variant="default", shape=shape, dtype=dtype, modes=("fwd", "bwd", "fwd+bwd", "jvp"),
                        make_inputs=_inputs(shape, dtype, False), scm=scm, reference=eager, bytes=_bytes,
                        diff=("x", "weight", "bias", "scale", "shift"), copy_like="x"))
    out.append(Case(op=OP, variant="channels_last", shape=shape, dtype=torch.float32, modes=("fwd", "bwd", "fwd+bwd"),
                    make_inputs=_inputs(shape, torch.float32, True), scm=scm, reference=eager_cl, bytes=_bytes,
                    diff=("x", "weight", "bias", "scale", "shift"), copy_like="x"))
    return out
