"""Triton kernels of attention: the forward and fused JVP kernels (triton_fwd.py), the backward
kernels (triton_bwd.py), and their launchers registered as torch.ops.scm_triton.attention_* custom
ops, so that torch.compile traces them through their fake implementations.

The launchers follow the contract of the C++ schemas in csrc/ops.cpp (attention block): q, k, v of
one dtype with inner stride 1 and free other strides, an optional expanded (B, Hq, Nq, Nk) mask
(bool or float32 additive), outputs out/out_tangent as (B, Nq, Hq, Dv) memory viewed as
(B, Hq, Nq, Dv), lse/mu (B, Hq, Nq) float32. `precision` ("ieee" or "tf32") is the precision of the
fp32 tl.dot; the interpreter is always exact.
"""

from __future__ import annotations

import torch

from scm_kernels.attention import triton_bwd, triton_fwd
from scm_kernels.attention.function import grads_like, out_like, stats

AOT_SPECS = list(triton_fwd.AOT_SPECS) + list(triton_bwd.AOT_SPECS)

_FWD = "(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale, str precision)"
_BWD = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, bool is_causal, "
        "float scale, str precision)")
_JVP = ("(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, Tensor? mask, bool is_causal, "
        "float scale, str precision)")
_JVP_BWD = ("(Tensor? grad_out, Tensor? grad_out_tangent, Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, "
            "Tensor? tv, Tensor out, Tensor out_tangent, Tensor lse, Tensor mu, Tensor? mask, bool is_causal, "
            "float scale, str precision)")


@torch.library.custom_op("scm_triton::attention_fwd", mutates_args=(), schema=_FWD + " -> (Tensor, Tensor)")
def attention_fwd(q, k, v, mask, is_causal, scale, precision):
    return triton_fwd.attention_fwd(q, k, v, mask, is_causal, scale, precision=precision)


@attention_fwd.register_fake
def _(q, k, v, mask, is_causal, scale, precision):
    return out_like(q, v), stats(q)


@torch.library.custom_op("scm_triton::attention_bwd", mutates_args=(), schema=_BWD + " -> (Tensor, Tensor, Tensor)")
def attention_bwd(grad_out, q, k, v, out, lse, mask, is_causal, scale, precision):
    return triton_bwd.attention_bwd(grad_out, q, k, v, out, lse, mask, is_causal, scale, precision=precision)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, is_causal, scale, precision):
    return grads_like(q, k, v)


@torch.library.custom_op("scm_triton::attention_jvp", mutates_args=(),
                         schema=_JVP + " -> (Tensor, Tensor, Tensor, Tensor)")
def attention_jvp(q, k, v, tq, tk, tv, mask, is_causal, scale, precision):
    return triton_fwd.attention_jvp(q, k, v, tq, tk, tv, mask, is_causal, scale, precision=precision)


@attention_jvp.register_fake
def _(q, k, v, tq, tk, tv, mask, is_causal, scale, precision):
    return out_like(q, v), out_like(q, v), stats(q), stats(q)


@torch.library.custom_op("scm_triton::attention_jvp_bwd", mutates_args=(),
                         schema=_JVP_BWD + " -> (Tensor, Tensor, Tensor, Tensor?, Tensor?, Tensor?)")
def attention_jvp_bwd(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse, mu, mask, is_causal,
                      scale, precision):
    return triton_bwd.attention_jvp_bwd(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse, mu,
                                        mask, is_causal, scale, precision=precision)


@attention_jvp_bwd.register_fake
def _(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse, mu, mask, is_causal, scale, precision):
    return grads_like(q, k, v, tq, tk, tv)
