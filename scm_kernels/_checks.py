"""Argument validation with clear messages, shared by every op.

Every check raises before any kernel runs: TypeError for a wrong type or dtype, ValueError for a
wrong shape, device, value or option. Messages name the argument, what it got and what it expects.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES_64 = FLOAT_DTYPES + (torch.float64,)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x, name: str, op: str, *, dtypes=FLOAT_DTYPES_64, min_ndim: int = 0) -> torch.Tensor:
    """x must be a tensor of one of `dtypes` with at least `min_ndim` dims and no zero-size dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")
    return x


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; "
                             "all tensors must be on one device")


def same_shape(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                             f"got {tuple(x.shape)}")


def number(x, name: str, op: str, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {x}")
    if nonneg and x < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {x}")
    return x


def integer(x, name: str, op: str, *, min_value: int | None = None, max_value: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
    x = int(x)
    if min_value is not None and x < min_value:
        raise ValueError(f"{op}: {name} must be >= {min_value}, got {x}")
    if max_value is not None and x > max_value:
        raise ValueError(f"{op}: {name} must be <= {max_value}, got {x}")
    return x


def choice(x, name: str, op: str, options: tuple) -> str:
    if x not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {x!r}")
    return x


def _must_check_values(x: torch.Tensor) -> bool:
    """Value checks need a host sync on CUDA: skip them while a CUDA graph is being captured, while
    torch.compile traces (a data-dependent branch would break the graph), and when the user turned
    them off with SCM_KERNELS_CHECK_VALUES=0."""
    if torch.compiler.is_compiling() or os.environ.get("SCM_KERNELS_CHECK_VALUES") == "0":
        return False
    if x.is_cpu:
        return not isinstance(x, FakeTensor)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not isinstance(x, FakeTensor) and not x.is_meta


def finite(x: torch.Tensor, name: str, op: str) -> None:
    """Values of x (e.g. times) must be finite."""
    if _must_check_values(x):
        # Fast path: one reduction and one host read; a NaN or an infinity makes the sum non-finite
        # (an overflowing sum of finite values only sends us to the exact check below).
        if math.isfinite(float(x.detach().sum())):
            return
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            first = x.detach().reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(f"{op}: {name} must be finite, got {int(bad.sum())} non-finite value(s) (e.g. {first})")


def per_sample(x, name: str, op: str, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar: a Python number, a 1-element tensor, or a tensor of B elements whose
    shape is (B,) or (B, 1, ..., 1). Returns a float32 (B,) tensor on like's device (a stride-0
    expansion for scalars), after checking that its values are finite."""
    if isinstance(x, torch.Tensor):
        tensor(x, name, op)
        if x.device != like.device:
            raise ValueError(f"{op}: {name} is on {x.device} but the data is on {like.device}")
        if x.dtype == torch.float32 and x.dim() == 1 and x.shape[0] == batch:  # already (B,) float32
            finite(x, name, op)
            return x
        if x.numel() == 1:
            v = x.reshape(1).to(torch.float32).expand(batch)
        elif x.numel() == batch and x.dim() >= 1 and x.shape[0] == batch:
            v = x.reshape(batch).to(torch.float32)
        else:
            raise ValueError(f"{op}: {name} must be a scalar or hold one value per sample, shape ({batch},) "
                             f"or ({batch}, 1, ...); got shape {tuple(x.shape)}")
    else:
        v = torch.full((1,), number(x, name, op), dtype=torch.float32, device=like.device).expand(batch)
        return v
    finite(v, name, op)
    return v
