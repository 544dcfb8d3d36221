"""The kernels of one fused op per backend name, resolved on first use.

Every op with a forward, a JVP and a backward kernel registers them as the schema ops
``<op>``, ``<op>_jvp`` and ``<op>_backward``: in ``torch.ops.scm`` for the C++ extension (the "cpu"
backend, and "cuda" whose CUDA kernels are the same schema ops' CUDA dispatch) and in
``torch.ops.scm_triton`` for the Triton kernels, which register when their module is imported, so
triton is imported only when a Triton kernel first runs.
"""

from __future__ import annotations

import importlib

import torch

BACKENDS = ("cpu", "cuda", "triton")


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
            if name == "triton":
                importlib.import_module(self.triton_module)  # registers torch.ops.scm_triton.<op>*
                ns = torch.ops.scm_triton
            elif name in ("cpu", "cuda"):
                ns = torch.ops.scm
            else:
                raise KeyError(f"{self.op}: no kernels for backend {name!r} (kernel backends: {BACKENDS})")
            k = self._resolved[name] = (getattr(ns, self.op), getattr(ns, f"{self.op}_jvp"),
                                        getattr(ns, f"{self.op}_backward"))
        return k

    def _caller(self, name: str, i: int):
        return lambda *args: self(name)[i](*args)
