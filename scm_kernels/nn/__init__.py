"""torch.nn modules built on the fused ops of scm_kernels.

Attention (scm_kernels.nn.attention) and AdaptiveGroupNorm (scm_kernels.nn.norm); both are
forward-mode differentiable (torch.func.jvp over a model that contains them), through the fused
kernels' JVP.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Attention": "scm_kernels.nn.attention",
    "AttentionProcessor": "scm_kernels.nn.attention",
    "AdaptiveGroupNorm": "scm_kernels.nn.norm",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scm_kernels.nn' has no attribute {name!r}")
