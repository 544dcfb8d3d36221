"""Helpers shared by the autograd Functions of the ops."""

from __future__ import annotations

import torch


def traceable(fn_cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function without its custom `jvp`, for torch.compile.

    Dynamo refuses to trace autograd Functions that define `jvp` ("Unsupported custom jvp"), and
    torch.compile does not trace forward-mode AD anyway; forward and backward are unchanged, so a
    compiled graph runs the same kernels (through their fake implementations while tracing)."""
    return type(fn_cls.__name__ + "Traceable", (fn_cls,), {"jvp": torch.autograd.Function.jvp,
                                                             "__doc__": traceable.__doc__})


def pick(fn_cls: type[torch.autograd.Function], traceable_cls: type[torch.autograd.Function]):
    """fn_cls normally, traceable_cls while torch.compile traces."""
    return traceable_cls if torch.compiler.is_compiling() else fn_cls
