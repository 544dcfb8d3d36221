"""Which backend runs an op: `triton`, `cuda`, `cpu` or `reference`.

Choice, first match wins:
  1. the op's `backend=` argument;
  2. the innermost `use_backend(...)` context;
  3. the environment variable SCM_KERNELS_BACKEND (read at every call);
  4. automatic, by device: CUDA tensors -> triton if importable, else cuda if the extension has
     CUDA kernels, else reference; CPU tensors -> cpu if scm_kernels._C is built, else reference.

An explicitly chosen backend that cannot run the call raises a ValueError that says why; only the
automatic choice falls back. Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (the
interpreter tier of the tests).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "SCM_KERNELS_BACKEND"

_state = threading.local()


# ---------------------------------------------------------------------------------------------
# The compiled extension
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load_extension() -> tuple[object | None, str]:
    """Import scm_kernels._C once; return (module or None, reason it is missing)."""
    try:
        from scm_kernels import _C  # noqa: F401  (registers torch.ops.scm.*)
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return None, f"{type(e).__name__}: {e}"
    return _C, ""


_warned = False


def extension_available() -> bool:
    """True when scm_kernels._C is loaded; warns once, naming the reason, when it is not."""
    global _warned
    mod, why = _load_extension()
    if mod is None and not _warned:
        _warned = True
        warnings.warn(
            f"scm_kernels: the compiled extension scm_kernels._C is not available ({why}); the 'cpu' "
            "and 'cuda' backends are disabled, ops run on the 'triton' and 'reference' backends. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return mod is not None


@functools.lru_cache(maxsize=None)
def extension_has_cuda() -> bool:
    """True when scm_kernels._C was built with its CUDA kernels."""
    if not extension_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("scm::trigflow_step", "CUDA")
    except Exception:
        return False


def triton_interpret() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------
def _validate_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{where}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run every scm_kernels op inside the block on backend `name` (unless a call passes its own)."""
    _validate_name(name, "use_backend(name)")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def requested_backend(backend: str | None = None) -> str | None:
    """The backend asked for by argument, context or environment, or None for automatic."""
    if backend is not None:
        return _validate_name(backend, "backend")
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return _validate_name(env, f"environment variable {ENV_VAR}")
    return None


def auto_backend(device: torch.device) -> str:
    if device.type == "cuda":
        if triton_available():
            return "triton"
        if extension_has_cuda():
            return "cuda"
        return "reference"
    if device.type == "cpu" and extension_available():
        return "cpu"
    return "reference"


def select(device: torch.device, backend: str | None = None, op: str = "op") -> str:
    """Resolve the backend for a call whose tensors live on `device`; raise if it cannot run."""
    name = requested_backend(backend)
    if name is None:
        return auto_backend(device)
    if name == "reference":
        return name
    if name == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend 'triton' requested but triton is not installed (pip install triton)")
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return name
        raise ValueError(
            f"{op}: backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
            f"got tensors on {device}"
        )
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
        if not extension_available():
            raise ValueError(f"{op}: backend 'cpu' requested but scm_kernels._C is not built ({_load_extension()[1]})")
        return name
    # cuda
    if device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if not extension_has_cuda():
        raise ValueError(f"{op}: backend 'cuda' requested but scm_kernels._C was built without CUDA kernels")
    return name


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run ops on tensors of `device` in this process."""
    device = torch.device(device)
    out = []
    for name in BACKENDS:
        try:
            select(device, name)
        except ValueError:
            continue
        out.append(name)
    return out
