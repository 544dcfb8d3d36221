"""The kernels of one fused op per backend name, resolved on first use.

Every op with a forward, a JVP and a backward kernel registers them as the schema ops
``<op>``, ``<op>_jvp`` and ``<op>_backward``: in ``torch.ops.scm`` for the C++ extension (the "cpu"
backend, and "cuda" whose CUDA kernels are the same schema ops' CUDA dispatch) and in
``torch.ops.scm_triton`` for the Triton kernels, which register when their module is imported, so
triton is imported only when a Triton kernel first runs.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("cpu", "cuda", "triton")


def _needs_dispatcher(args) -> bool:
    """True where a Triton launcher must go through its registered custom op: under torch.compile,
    a Python dispatch mode (FakeTensorMode, FlopCounterMode, ...), or with fake, meta or functorch-
    wrapped tensors among the arguments."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    for a in args:
        if isinstance(a, torch.Tensor) and (isinstance(a, FakeTensor) or a.is_meta
                                            or torch._C._functorch.is_functorch_wrapped_tensor(a)):
            return True
    return False


def eager_fast(op) -> Callable:
    """The Triton launcher under a `torch.library.custom_op`, called directly in plain eager mode.

    The custom op is what torch.compile traces (through its fake implementation) and what dispatch
    modes see; in plain eager mode its Python dispatch is host time on top of the launch (measured on
    an H100 host: a time_embedding call went from 0.196 to 0.134 ms with this bypass, for a 2.6 us
    kernel). Our autograd Functions already give the derivatives, so eager calls go straight to the
    function the custom op wraps, and every other call through the op. Falls back to the op where
    torch keeps no reference to that function."""
    raw = getattr(op, "_init_fn", None)
    if raw is None:
        return op

    def call(*args):
        return op(*args) if _needs_dispatcher(args) else raw(*args)

    call.__name__ = getattr(raw, "__name__", "launcher")
    call.__doc__ = raw.__doc__
    return call


class KernelTable:
    """``table(name)`` -> (forward, jvp, backward) of op `op` on backend `name`, with the arguments of
    the csrc/ops.cpp schemas; ``table.launch`` / ``.jvp`` / ``.backward``: dicts backend name ->
    callable that resolves on its first call."""

    def __init__(self, op: str, triton_module: str):
        self.op, self.triton_module = op, triton_module
        self._resolved: dict[str, tuple] = {}
        self.launch = {name: self._caller(name, 0) for name in BACKENDS}
        self.jvp = {name: self._caller(name, 1) for name in BACKENDS}
        self.backward = {name: self._caller(name, 2) for name in BACKENDS}

    def __call__(self, name: str) -> tuple:
        k = self._resolved.get(name)
        if k is None:
            names = (self.op, f"{self.op}_jvp", f"{self.op}_backward")
            if name == "triton":
                mod = importlib.import_module(self.triton_module)  # registers torch.ops.scm_triton.<op>*
                k = tuple(eager_fast(getattr(mod, n)) for n in names)
            elif name in ("cpu", "cuda"):
                k = tuple(getattr(torch.ops.scm, n) for n in names)
            else:
                raise KeyError(f"{self.op}: no kernels for backend {name!r} (kernel backends: {BACKENDS})")
            self._resolved[name] = k
        return k

    def _caller(self, name: str, i: int):
        return lambda *args: self(name)[i](*args)
