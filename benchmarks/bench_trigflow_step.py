"""Benchmark cases of scm_kernels.trigflow_step (A23: x0 = cos t*x_t - sin t*sigma_d*F, then
renoise x_s = cos s*x0 + sin s*sigma_d*eps, or uint8 pixels).

Sampling variants (each its own case):
  denoise        x0 only (t_next=None)                       fwd, bwd, fwd+bwd, jvp (w.r.t. x_t, F)
  renoise-noise  renoise with a given noise tensor           fwd
  renoise-seed   renoise with in-kernel Philox noise (seed)  fwd; the eager baseline draws
                 noise=torch.randn(...) inside the timed call (what a user writes), not the
                 reference's Philox emulation
  uint8          denoise to uint8 pixels                     fwd
Sizes: B=64 images of 3x64x64 in fp32 and bf16; t, t_next are (B,) fp32.

Minimal bytes (N = elements of x_t, e = its element size, B = batch, times are fp32):
  fwd denoise       read x_t, F, t              write out          = 2*N*e + 4B + N*e
  fwd renoise-noise read x_t, F, noise, t, s    write out          = 3*N*e + 8B + N*e
  fwd renoise-seed  read x_t, F, t, s           write out          = 2*N*e + 8B + N*e
  fwd uint8         read x_t, F, t              write out (uint8)  = 2*N*e + 4B + N
  bwd               read dy, t                  write dx_t, dF     = N*e + 4B + 2*N*e
                    (the gradients are per-sample multiples of dy: x_t and F are not read)
  fwd+bwd           read x_t, F, t, dy          write out, dx_t, dF = 3*N*e + 4B + 3*N*e
  jvp               read x_t, F, t, x_t', F'    write out, out'    = 4*N*e + 4B + 2*N*e
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import Case, Target, import_op, nbytes

OP = "trigflow_step"
SIGMA_D = 0.5
T_NEXT = 1.1  # the 2-step sampler's middle time (A22)
SEED = 1234

TARGETS = [
    Target(f"{OP} {v} fwd fp32: scm >= 2x eager", v, "fwd", "fp32", "x_eager", 2.0)
    for v in ("denoise", "renoise-noise", "renoise-seed", "uint8")
] + [
    Target(
        f"{OP} denoise fwd fp32: scm GB/s >= 50% of a same-size copy",
        "denoise",
        "fwd",
        "fp32",
        "copy_bw",
        0.5,
    ),
]


def _inputs(shape, dtype, variant):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        B = shape[0]
        inp = {
            "x_t": torch.randn(shape, generator=g, device=device).mul_(SIGMA_D).to(dtype),
            "F": torch.randn(shape, generator=g, device=device).to(dtype),
            "t": torch.rand(B, generator=g, device=device).mul_(math.pi / 2 - 0.1).add_(0.05),
        }
        if variant.startswith("renoise"):
            inp["t_next"] = torch.full((B,), T_NEXT, device=device)
        if variant == "renoise-noise":
            inp["noise"] = torch.randn(shape, generator=g, device=device).to(dtype)
        return inp

    return make


def _bytes(variant):
    def formula(mode, i):
        x, F, t = i["x_t"], i["F"], i["t"]
        N, e = x.numel(), x.element_size()
        if mode == "fwd":
            out = N * (1 if variant == "uint8" else e)
            return nbytes(x, F, t, i.get("noise"), i.get("t_next")) + out
        if mode == "bwd":
            return N * e + nbytes(t) + 2 * N * e
        if mode == "fwd+bwd":
            return nbytes(x, F, t) + N * e + 3 * N * e
        if mode == "jvp":
            return 2 * nbytes(x, F) + nbytes(t) + 2 * N * e
        raise ValueError(mode)

    return formula


def _functions(variant):
    op, ref = import_op(OP)
    if variant == "denoise":
        return (lambda x_t, F, t: op(x_t, F, t, SIGMA_D), lambda x_t, F, t: ref(x_t, F, t, SIGMA_D))
    if variant == "renoise-noise":
        return (
            lambda x_t, F, t, t_next, noise: op(x_t, F, t, SIGMA_D, t_next=t_next, noise=noise),
            lambda x_t, F, t, t_next, noise: ref(x_t, F, t, SIGMA_D, t_next=t_next, noise=noise),
        )
    if variant == "renoise-seed":

        def eager(x_t, F, t, t_next):  # what a user writes: fresh torch normals each call
            noise = torch.randn(x_t.shape, dtype=x_t.dtype, device=x_t.device)
            return ref(x_t, F, t, SIGMA_D, t_next=t_next, noise=noise)

        return (lambda x_t, F, t, t_next: op(x_t, F, t, SIGMA_D, t_next=t_next, seed=SEED), eager)
    if variant == "uint8":
        return (
            lambda x_t, F, t: op(x_t, F, t, SIGMA_D, out_uint8=True),
            lambda x_t, F, t: ref(x_t, F, t, SIGMA_D, out_uint8=True),
        )
    raise ValueError(variant)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    shape = (64, 3, 64, 64)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for variant in ("denoise", "renoise-noise", "renoise-seed", "uint8"):
            scm, ref = _functions(variant)
            modes = ("fwd", "bwd", "fwd+bwd", "jvp") if variant == "denoise" else ("fwd",)
            out.append(
                Case(
                    op=OP,
                    variant=variant,
                    shape=shape,
                    dtype=dtype,
                    modes=modes,
                    make_inputs=_inputs(shape, dtype, variant),
                    scm=scm,
                    reference=ref,
                    bytes=_bytes(variant),
                    diff=("x_t", "F"),
                    copy_like="x_t",
                )
            )
    return out
