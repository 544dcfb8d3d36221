"""Benchmark cases of scm_kernels.attention (A24-A27): flash attention with backward and JVP.

Providers (besides scm / eager / compile of benchmarks.harness):
  eager          torch's F.scaled_dot_product_attention with its best backend for the device (CPU:
                 its flash kernel; CUDA: FlashAttention-2 / cuDNN / efficient). It has no JVP: its
                 jvp row says so.
  sdpa-math      F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.MATH): the path people
                 fall back to for torch.func.jvp (materializes B*H*Nq*Nk tensors).
  scm-attention_jvp  the explicit scm_kernels.attention_jvp (primal and tangent from the one fused
                 pass), mode jvp only; `scm` in mode jvp is torch.func.jvp over scm_kernels.attention.

FLOPs (algorithm.md section 5): forward 4*B*H*Nq*Nk*D, backward 2.5x that, fwd+bwd 3.5x, JVP 3x.
Minimal bytes: fwd reads q, k, v and writes out; bwd reads q, k, v, out, dout and writes
dq, dk, dv; fwd+bwd the union; jvp reads q, k, v and their tangents and writes out and its tangent.

CPU targets (issue 3; fp32, B=1, H=8, N=4096, D=64; ratios in one run): JVP <= 3.5x the time of
torch's CPU SDPA forward, >= 4x faster than torch.func.jvp over math SDPA, JVP peak memory <= 1/20
of the math path's (measured with --memory); forward and backward within 1.3x of torch's CPU flash
SDPA. GPU targets (H100, bf16, d=64, N=8192): JVP >= 500 TFLOP/s; forward >= 85% of torch's SDPA
(FlashAttention-2 on that device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import Baseline, Case, Target, nbytes

OP = "attention"
BASELINES = ("sdpa-math", "scm-attention_jvp")
CPU_SHAPE = "1x8x4096x64"
GPU_SHAPE = "4x16x8192x64"

TARGETS = [
    Target(f"{OP} jvp fp32: scm <= 3.5x the time of torch SDPA forward", "self", "jvp", "fp32", "speedup", 1 / 3.5,
           CPU_SHAPE, baseline="eager", baseline_mode="fwd"),
    Target(f"{OP} jvp fp32: scm >= 4x faster than torch.func.jvp over math SDPA", "self", "jvp", "fp32", "speedup",
           4.0, CPU_SHAPE, baseline="sdpa-math"),
    Target(f"{OP} jvp fp32: scm peak memory <= 1/20 of math SDPA's", "self", "jvp", "fp32", "memory", 20.0,
           CPU_SHAPE, baseline="sdpa-math"),
    Target(f"{OP} fwd fp32: scm within 1.3x of torch SDPA", "self", "fwd", "fp32", "speedup", 1 / 1.3, CPU_SHAPE,
           baseline="eager"),
    Target(f"{OP} bwd fp32: scm within 1.3x of torch SDPA", "self", "bwd", "fp32", "speedup", 1 / 1.3, CPU_SHAPE,
           baseline="eager"),
    Target(f"{OP} fwd bf16 (GPU): scm >= 85% of torch SDPA (FlashAttention-2)", "self", "fwd", "bf16", "speedup",
           0.85, GPU_SHAPE, baseline="eager"),
]


def _inputs(B, H, N, D, dtype):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        return {name: torch.randn(B, H, N, D, generator=g, device=device).to(dtype) for name in ("q", "k", "v")}

    return make


def _flops(mode, i):
    B, H, N, D = i["q"].shape
    fwd = 4 * B * H * N * i["k"].shape[2] * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd, "jvp": 3 * fwd}[mode]


def _bytes(mode, i):
    q, k, v = i["q"], i["k"], i["v"]
    io = nbytes(q, k, v)
    out = q.numel() // q.shape[-1] * v.shape[-1] * q.element_size()
    if mode == "fwd":
        return io + out
    if mode == "bwd":  # read q, k, v, out, dout; write dq, dk, dv (the (B, H, N) lse is not counted)
        return io + 2 * out + io
    if mode == "fwd+bwd":
        return io + out + out + io
    if mode == "jvp":
        return 2 * io + 2 * out
    raise ValueError(mode)


def _scm(q, k, v):
    import scm_kernels

    return scm_kernels.attention(q, k, v)


def _scm_jvp(primals, tangents):
    import scm_kernels

    return scm_kernels.attention_jvp(*primals, *tangents)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        shapes = [((4, 16, 8192, 64), torch.bfloat16), ((4, 16, 8192, 128), torch.bfloat16),
                  ((4, 16, 4096, 64), torch.float16)]
        if quick:
            shapes = [((2, 16, 4096, 64), torch.bfloat16)]
    else:
        shapes = [((1, 8, 1024, 64), torch.float32)] if quick else [((1, 8, 4096, 64), torch.float32)]
    out = []
    for (B, H, N, D), dtype in shapes:
        out.append(Case(
            op=OP, variant="self", shape=(B, H, N, D), dtype=dtype, modes=("fwd", "bwd", "fwd+bwd", "jvp"),
            make_inputs=_inputs(B, H, N, D, dtype), scm=_scm, reference=_sdpa, bytes=_bytes, diff=("q", "k", "v"),
            flops=_flops,
            baselines={"sdpa-math": Baseline(_sdpa_math),
                       "scm-attention_jvp": Baseline(None, modes=("jvp",), jvp=_scm_jvp, backend="auto")},
            # the math path takes seconds per call at N=4096 on a CPU
            max_repeats=9 if device.type == "cpu" and N >= 4096 else None,
        ))
    return out
