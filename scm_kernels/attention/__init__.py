"""Flash attention with backward and forward-mode JVP (A24-A27), O(N) memory on every backend.

`attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)` has the semantics of
F.scaled_dot_product_attention for (B, H, N, D) tensors and is differentiable by backward,
torch.func.jvp and torch.autograd.forward_ad dual tensors, also inside a whole model that is JVP'ed
(PyTorch's fused SDPA kernels have no JVP; its math fallback materializes B*H*Nq*Nk tensors).
`attention_jvp(q, k, v, tq, tk, tv, ...)` is the explicit form, (out, out_tangent) from one fused
pass, with a backward through both outputs (A27).

Semantics (section 5 of algorithm.md): s = scale * q k^T (+ additive mask), -inf where a boolean
mask is False or causality hides the key; P = softmax(s); out = P v.
  * q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): one float dtype (float32, float16,
    bfloat16; float64 on the cpu and reference backends), head dims 1..256 of any value, D != Dv
    and Nq != Nk allowed. Hq != Hkv needs enable_gqa=True and Hq % Hkv == 0 (query head h reads kv
    head h // (Hq / Hkv)).
  * attn_mask: None, or broadcastable to (B, Hq, Nq, Nk): bool (True = attend) or float (added to
    the logits; converted to float32). It has no gradient.
  * is_causal: key j visible to query i iff j <= i (top-left aligned when Nq != Nk, like torch);
    may be combined with attn_mask (torch refuses the combination; here both apply).
  * A query row whose keys are all hidden returns 0 (torch's math SDPA returns NaN).
  * Strided inputs: any strides with inner stride 1 run without copies, e.g. (B, N, H, D) memory
    viewed as (B, H, N, D) by .transpose(1, 2); a tensor whose last dim is strided is copied once.
    The output is (B, Nq, Hq, Dv) memory viewed as (B, Hq, Nq, Dv), so that
    out.transpose(1, 2).reshape(B, Nq, Hq * Dv) is free (torch's flash attention does the same).
  * fp16/bf16 inputs are accumulated in fp32; logits live in fp32 (fp16 logits of 1e4 are fine).
  * precision: the fp32 matmul precision of the Triton kernels on GPU, "ieee" or "tf32"; default
    "ieee" when torch.get_float32_matmul_precision() is "highest" (PyTorch's default), else "tf32".
    "ieee" runs near-fp32 products on the tensor cores (tl.dot's 3xTF32 split: each product good to
    about 2^-21 relative, sums in fp32), in the forward, the JVP and the backward alike. Where no
    such kernel compiles without register spills (the JVP at heads wider than 128, the backward in
    some families) the Triton backend computes that step with PyTorch fp32 matmuls over blocks of
    query rows instead: O(block x Nk) memory, slower, the same numbers.
    The CPU kernels are always fp32 (fp64 for fp64 inputs).

Forward-mode AD: under torch.func.jvp / forward_ad, `attention` sees the tangents of q, k, v (the
innermost dual level) and runs the fused kernel (A25) once for the primal and the tangent, as
`attention_jvp` does; both stay differentiable by backward (A27). The autograd Function's own jvp
rule (forward kernel, then the tangent from the saved out and lse) remains for the cases that reach
it (tangents of an outer level under nested transforms). Second derivatives through the backward
(create_graph=True double backward, torch.func.grad of torch.func.grad, torch.func.jvp over
torch.func.grad for Hessian-vector products) are exact: such a backward runs (A26) in
differentiable plain PyTorch (O(N^2) memory there only); so does attention_jvp's backward (A27),
and a forward-mode derivative of attention_jvp's outputs (a second-order tangent) is computed the
same way.
torch.compile: a model calling `attention` compiles (forward and backward, fullgraph). A JVP of a
compiled function is refused with a clear error (dynamo drops custom JVP rules, pytorch issue
192985, which would give wrong tangents silently).
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from scm_kernels import _autograd, _checks, backend as _backend
from scm_kernels.attention import reference
from scm_kernels.attention.function import (AttentionDualFunction, AttentionFunction, AttentionJvpFunction,
                                            AttentionPrimalJvpFunction, inner)

OP = "scm_kernels.attention"
OP_JVP = "scm_kernels.attention_jvp"
MAX_HEAD_DIM = 256
PRECISIONS = ("ieee", "tf32")

_AttentionTraceable = _autograd.traceable(AttentionFunction)
_AttentionJvpTraceable = _autograd.traceable(AttentionJvpFunction)
_AttentionPrimalJvpTraceable = _autograd.traceable(AttentionPrimalJvpFunction)
_AttentionDualTraceable = _autograd.traceable(AttentionDualFunction)

__all__ = ["attention", "attention_jvp", "AttentionFunction", "AttentionJvpFunction", "AttentionDualFunction",
           "AttentionPrimalJvpFunction", "MAX_HEAD_DIM"]


class _Call:
    """The validated arguments of one call."""

    __slots__ = ("q", "k", "v", "mask", "is_causal", "scale", "gqa", "name", "precision")


def _check_qkv(op, q, k, v, enable_gqa):
    q = _checks.tensor(q, "query", op)
    k = _checks.tensor(k, "key", op)
    v = _checks.tensor(v, "value", op)
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, N, D), got shape {tuple(x.shape)}")
    for name, x in (("key", k), ("value", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {x.dtype} but query has {q.dtype}; q, k, v must share one dtype")
    _checks.same_device(op, "query", q, key=k, value=v)
    B, Hq, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: batch sizes differ: query {B}, key {k.shape[0]}, value {v.shape[0]}")
    if k.shape[-1] != D:
        raise ValueError(f"{op}: head dim of key ({k.shape[-1]}) must equal head dim of query ({D})")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: value (B, Hkv, Nk, Dv) = {tuple(v.shape)} must have the heads and length of "
                         f"key {tuple(k.shape)}")
    for name, d in (("query/key", D), ("value", v.shape[-1])):
        if d > MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dim of {name} must be <= {MAX_HEAD_DIM}, got {d}")
    Hkv = k.shape[1]
    if Hkv != Hq:
        if not enable_gqa:
            raise ValueError(f"{op}: query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for "
                             "grouped-query attention")
        if Hq % Hkv:
            raise ValueError(f"{op}: enable_gqa needs the query heads ({Hq}) to be a multiple of the key/value "
                             f"heads ({Hkv})")
    return q, k, v


def _check_mask(op, mask, q, k):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{op}: attn_mask must be bool (True = attend) or a float tensor (added to the logits), "
                        f"got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{op}: attn_mask is on {mask.device} but query is on {q.device}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    ok = mask.dim() <= 4 and all(m in (1, f) for m, f in zip(reversed(mask.shape), reversed(full)))
    if not ok:
        raise ValueError(f"{op}: attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, Hq, Nq, Nk) = {full}")
    if mask.requires_grad:
        raise ValueError(f"{op}: attn_mask requires grad, but the fused kernels give no gradient to the mask; "
                         "detach it, or use backend='reference'")
    return mask


@torch.compiler.assume_constant_result  # read once while tracing (dynamo cannot trace the getter)
def _matmul_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _default_precision(precision, op):
    if precision is None:
        return _matmul_precision()
    return _checks.choice(precision, "precision", op, PRECISIONS)


def _prepare(op, q, k, v, attn_mask, is_causal, scale, enable_gqa, backend, precision) -> _Call:
    c = _Call()
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{op}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    c.q, c.k, c.v = _check_qkv(op, q, k, v, enable_gqa)
    c.mask = _check_mask(op, attn_mask, c.q, c.k)
    c.scale = 1.0 / math.sqrt(c.q.shape[-1]) if scale is None else _checks.number(scale, "scale", op)
    c.is_causal, c.gqa = is_causal, enable_gqa
    c.precision = _default_precision(precision, op)
    name = _backend.select(c.q.device, backend, op=op)
    if name == "cuda":
        if _backend.requested_backend(backend) == "cuda":
            raise ValueError(f"{op}: there is no CUDA C++ attention kernel; use backend='triton' for CUDA tensors")
        name = "reference"  # automatic choice without triton
    if name == "triton" and c.q.dtype == torch.float64:
        raise TypeError(f"{op}: backend 'triton' takes float32, float16 or bfloat16 inputs, got float64; "
                        "use backend='cpu' or 'reference' for float64")
    c.name = name
    return c


def _kernel_args(c: _Call):
    """q, k, v with inner stride 1 and the mask as an expanded (B, Hq, Nq, Nk) bool/float32 view."""
    mask = c.mask
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.detach().to(torch.float32)
        full = (c.q.shape[0], c.q.shape[1], c.q.shape[2], c.k.shape[2])
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(full)
    return inner(c.q), inner(c.k), inner(c.v), mask


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v, (B, Hq, Nq, Dv) in the inputs' dtype (see the module doc).

    Args:
        query: (B, Hq, Nq, D); key: (B, Hkv, Nk, D); value: (B, Hkv, Nk, Dv); one float dtype.
        attn_mask: None, or bool / float, broadcastable to (B, Hq, Nq, Nk).
        is_causal: hide key j from query i when j > i.
        scale: the logit scale; default 1 / sqrt(D).
        enable_gqa: allow Hq = G * Hkv (grouped-query / multi-query attention).
        backend: "triton", "cpu", "reference" or None (automatic, see scm_kernels.backend).
        precision: fp32 matmul precision of the Triton kernels, "ieee" or "tf32" (see the module doc).
    """
    c = _prepare(OP, query, key, value, attn_mask, is_causal, scale, enable_gqa, backend, precision)
    if c.name == "reference":
        return reference.attention(c.q, c.k, c.v, c.mask, c.is_causal, c.scale, c.gqa)
    q, k, v, mask = _kernel_args(c)
    dual = _fused_jvp(q, k, v, mask, c)
    if dual is not None:
        return dual
    out, _ = _autograd.apply(AttentionFunction, _AttentionTraceable, q, k, v, mask, c.is_causal, c.scale, c.name,
                             c.precision)
    return out


def _fused_jvp(q, k, v, mask, c: _Call) -> torch.Tensor | None:
    """Forward-mode AD in one pass: when q, k or v carries a tangent of the innermost forward-AD level
    (torch.func.jvp, forward_ad.dual_level), the fused kernel (A25) computes the primal and the
    tangent together and the output is their dual tensor; None when there is no tangent.

    Without this, the autograd Function would run its forward kernel and then, in its jvp rule, a
    second kernel for the tangent (7 block products instead of 6 at no_grad, 8 with grad enabled,
    where the tangent must be differentiable and the fused kernel recomputes the primal). Reverse
    mode still works through both: the primal and the tangent come from AttentionDualFunction, whose
    backward is (A27)."""
    if fwAD._current_level < 0 or torch.compiler.is_compiling():
        return None
    parts = [fwAD.unpack_dual(x) for x in (q, k, v)]
    if all(p.tangent is None for p in parts):
        return None
    pq, pk, pv = (p.primal for p in parts)
    tq, tk, tv = (inner(p.tangent) if p.tangent is not None else None for p in parts)
    out, out_tangent, _, _ = _autograd.apply(AttentionDualFunction, _AttentionDualTraceable, pq, pk, pv, tq, tk,
                                             tv, mask, c.is_causal, c.scale, c.name, c.precision)
    return fwAD.make_dual(out, out_tangent)


def attention_jvp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_tangent: torch.Tensor | None,
    key_tangent: torch.Tensor | None,
    value_tangent: torch.Tensor | None,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
    precision: str | None = None,
    differentiable_tangent: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, out_tangent) of `attention` for the tangents (A24-A25), from one fused pass.

    Any tangent may be None (zero; the kernel skips that work). Tangents have their primal's shape,
    dtype and device. Both outputs are differentiable by backward (A27): gradients flow to q, k, v
    and to the tangents that were given.

    differentiable_tangent=False: out_tangent carries no gradient (it is returned detached); out's
    backward is then `attention`'s (A26) and the tangents are not saved for it. This is the call for
    a JVP pass taken with grad enabled whose tangent is only a target (sCM's merged pass, where the
    JVP's primal is the gradient pass: scm.SCMLoss(passes="merged")).
    """
    c = _prepare(OP_JVP, query, key, value, attn_mask, is_causal, scale, enable_gqa, backend, precision)
    tangents = []
    for name, x, t in (("query_tangent", c.q, query_tangent), ("key_tangent", c.k, key_tangent),
                       ("value_tangent", c.v, value_tangent)):
        if t is not None:
            _checks.tensor(t, name, OP_JVP)
            if t.shape != x.shape:
                raise ValueError(f"{OP_JVP}: {name} must have the shape of its primal {tuple(x.shape)}, "
                                 f"got {tuple(t.shape)}")
            if t.dtype != x.dtype:
                raise TypeError(f"{OP_JVP}: {name} has dtype {t.dtype} but its primal has {x.dtype}")
            if t.device != x.device:
                raise ValueError(f"{OP_JVP}: {name} is on {t.device} but its primal is on {x.device}")
        tangents.append(t)
    if not isinstance(differentiable_tangent, bool):
        raise TypeError(f"{OP_JVP}: differentiable_tangent must be a bool, got {differentiable_tangent!r}")
    if c.name == "reference":
        if differentiable_tangent:
            return reference.attention_jvp(c.q, c.k, c.v, *tangents, c.mask, c.is_causal, c.scale, c.gqa)
        tangents = [None if t is None else t.detach() for t in tangents]
        out, out_tangent = reference.attention_jvp(c.q, c.k, c.v, *tangents, c.mask, c.is_causal, c.scale,
                                                   c.gqa)
        return out, out_tangent.detach()
    q, k, v, mask = _kernel_args(c)
    tq, tk, tv = (inner(t) for t in tangents)
    fn, traceable = ((AttentionJvpFunction, _AttentionJvpTraceable) if differentiable_tangent else
                     (AttentionPrimalJvpFunction, _AttentionPrimalJvpTraceable))
    out, out_tangent, _, _ = _autograd.apply(fn, traceable, q, k, v, tq, tk, tv, mask, c.is_causal, c.scale,
                                             c.name, c.precision)
    return out, out_tangent
