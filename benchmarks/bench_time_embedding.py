"""Benchmark cases of scm_kernels.time_embedding (A10: emb = [cos(s*c*omega_k) | sin(s*c*omega_k)],
positional omega_k = exp(-ln(max_period)*k/half)).

Cases: B=256 times (fp32, in [0, pi/2]), dim 256 and 1024, positional kind; modes fwd, bwd,
fwd+bwd, jvp (w.r.t. t). The output is always fp32. Copy baseline: a (B, dim) fp32 tensor.

Minimal bytes (B times, dim outputs per time, fp32; omega_k is recomputed, not read):
  fwd      read t                 write emb (B, dim)      = 4B + 4*B*dim
  bwd      read dE (B, dim), t    write dt                = 4*B*dim + 4B + 4B
  fwd+bwd  read t, dE             write emb, dt           = 4B + 4*B*dim + 4*B*dim + 4B
  jvp      read t, t'             write emb, emb'         = 8B + 8*B*dim
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import Case, Target, import_op

OP = "time_embedding"
B = 256
DIMS = (256, 1024)

TARGETS = [
    Target(
        f"{OP} fwd fp32 (B={B}, dim={d}): scm >= 2x eager",
        "positional",
        "fwd",
        "fp32",
        "x_eager",
        2.0,
        shape=f"{B}x{d}",
    )
    for d in DIMS
]


def _inputs(device):
    g = torch.Generator(device=device).manual_seed(0)
    return {"t": torch.rand(B, generator=g, device=device).mul_(math.pi / 2)}


def _bytes_for(dim):
    def formula(mode, i):
        tb = i["t"].numel() * 4
        eb = i["t"].numel() * dim * 4
        return {"fwd": tb + eb, "bwd": eb + tb + tb, "fwd+bwd": tb + eb + eb + tb, "jvp": 2 * tb + 2 * eb}[
            mode
        ]

    return formula


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    op, ref = import_op(OP)
    out = []
    for dim in DIMS:
        out.append(
            Case(
                op=OP,
                variant="positional",
                shape=(B, dim),
                dtype=torch.float32,
                modes=("fwd", "bwd", "fwd+bwd", "jvp"),
                make_inputs=_inputs,
                scm=lambda t, dim=dim: op(t, dim),
                reference=lambda t, dim=dim: ref(t, dim),
                bytes=_bytes_for(dim),
                diff=("t",),
                copy_like=lambda i, dim=dim: torch.empty(i["t"].numel(), dim, device=i["t"].device),
            )
        )
    return out
