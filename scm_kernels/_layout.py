"""Per-sample (B, D) views of N-d tensors, without copies where the memory allows it.

Elementwise and per-sample-reduction kernels (trigflow_step, scm_loss) see every operand as a 2-D
(B, D) matrix whose inner stride is 1 and whose row stride is free. That view exists without a
copy whenever the elements of one sample form a dense block in memory, in any dimension order:
contiguous tensors, batch slices of them (x[::2]), channels_last tensors, tensors broadcast over
the batch (row stride 0). Operands are matched element by element in *memory* order, so all
operands of one call must share the inner layout of the first one; an operand whose layout differs
is copied into that layout (the only copy, documented in the ops' docstrings).
"""

from __future__ import annotations

import math

import torch


def inner_signature(x: torch.Tensor) -> tuple | None:
    """The inner layout of x (dims 1..) if one sample is a dense block in memory, else None.

    The signature lists (size, stride) of the non-singleton inner dims; two tensors of the same
    shape and signature store their samples' elements in the same order.
    """
    dims = [(st, sz) for sz, st in zip(x.shape[1:], x.stride()[1:]) if sz != 1]
    expected = 1
    for st, sz in sorted(dims):
        if st != expected:
            return None
        expected *= sz
    return tuple((sz, st) for st, sz in dims)


def sample_numel(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:])


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, D) view of a tensor whose samples are dense blocks (see inner_signature)."""
    B, D = x.shape[0], sample_numel(x)
    row_stride = x.stride(0) if B > 1 else D
    return x.as_strided((B, D), (row_stride, 1))  # keeps x's storage offset


def dense_base(x: torch.Tensor) -> torch.Tensor:
    """x itself when its samples are dense blocks, else a contiguous copy."""
    return x if x.is_contiguous() or inner_signature(x) is not None else x.contiguous()


def matched(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x with the inner layout of `ref` (same shape, ref's samples dense): itself when it already
    has it, else a copy."""
    if x.shape == ref.shape and (x.stride()[1:] == ref.stride()[1:] or inner_signature(x) == inner_signature(ref)):
        return x
    out = empty_like_rows(ref, x.dtype)
    out.copy_(x)
    return out


def empty_like_rows(ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor shaped like ref whose samples use ref's inner layout, packed back to back."""
    strides = list(ref.stride())
    strides[0] = sample_numel(ref)
    return torch.empty_strided(ref.shape, strides, dtype=dtype or ref.dtype, device=ref.device)
