"""autograd Functions of attention over the kernel backends.

`AttentionFunction` (q, k, v, mask, is_causal, scale, name, precision) -> (out, lse)
    forward   one flash-attention pass, lse (B, Hq, Nq) float32 saved (non-differentiable output)
    backward  (A26) from the saved out and lse: (dq, dk, dv)
    jvp       out_tangent. cpu: from the saved out and lse (attention_jvp_tangent: P = exp(s - lse)
              known, so no online softmax and no P V product). triton: (A25) the fused primal+tangent
              kernel on the saved inputs, whose recomputed primal is dropped (forward-mode AD has
              already returned the forward's).

`AttentionJvpFunction` (q, k, v, tq, tk, tv, mask, is_causal, scale, name, precision)
        -> (out, out_tangent, lse, mu)
    forward   the fused kernel (A25), lse and mu = rowsum(P * S_dot) saved (non-differentiable)
    backward  (A27) reverse mode through both outputs, to q, k, v and the tangents (the gradient
              of a loss that depends on out_tangent, e.g. an sCM loss differentiated through J);
              when that backward is itself differentiated, (A27) in plain PyTorch
              (reference_jvp_backward, O(N^2) memory)
    jvp       a second-order tangent of (out, out_tangent) in plain PyTorch (reference_jvp_jvp)

Tensors reach the kernels with inner stride 1 (the public function ensures it for inputs; the
gradients and tangents autograd hands over are fixed here). mask is an expanded (B, Hq, Nq, Nk)
view, bool or additive float, and has no derivative.
"""

from __future__ import annotations

import types

import torch
import torch.autograd.forward_ad as fwAD

from scm_kernels import backend
from scm_kernels._autograd import backward_is_differentiated


def inner(x: torch.Tensor | None) -> torch.Tensor | None:
    """x with inner stride 1: a copy only for tensors that lack it (e.g. expanded zero tangents); a
    last dim of size 1 only gets its stride relabelled."""
    if x is None or x.stride(-1) == 1:
        return x
    if x.shape[-1] == 1:
        return x.as_strided(x.shape, x.stride()[:-1] + (1,), x.storage_offset())
    return x.contiguous()


_TRITON = None


def _triton():
    """The Triton launchers (torch.ops.scm_triton.attention_*; direct calls in plain eager mode)."""
    global _TRITON
    if _TRITON is None:
        from scm_kernels._launch import eager_fast
        from scm_kernels.attention import triton_kernels as tk  # registers torch.ops.scm_triton.*

        names = ("attention_fwd", "attention_bwd", "attention_jvp", "attention_jvp_bwd")
        _TRITON = types.SimpleNamespace(**{n: eager_fast(getattr(tk, n)) for n in names})
    return _TRITON


# backend name -> launcher(*schema args, precision); the C++ ops dispatch on the tensors' device.
def _fwd(name, *args, precision):
    if name == "triton":
        return _triton().attention_fwd(*args, precision)
    return torch.ops.scm.attention_fwd(*args)


def _single_key_zero(grads, which):
    """With one key (Nk = 1) every softmax row is constant (P = 1, or 0 when masked), so the
    gradients w.r.t. q and k (and the tangents q', k' in (A27), where s' - mu = 0) are exactly zero;
    the kernels' ds = P (dO.v - Delta) would leave the rounding difference of two dot products
    (dO.v against dO.O, O = v) there instead. grads with the entries at `which` replaced by zeros."""
    return tuple(torch.zeros_like(g) if i in which and g is not None else g for i, g in enumerate(grads))


def _bwd(name, *args, precision):
    if name == "triton":
        grads = _triton().attention_bwd(*args, precision)
    else:
        grads = torch.ops.scm.attention_bwd(*args)
    return _single_key_zero(grads, (0, 1)) if args[2].shape[2] == 1 else grads


def _jvp(name, *args, precision):
    if name == "triton":
        return _triton().attention_jvp(*args, precision)
    return torch.ops.scm.attention_jvp(*args)


def _jvp_bwd(name, *args, precision):
    if name == "triton":
        grads = _triton().attention_jvp_bwd(*args, precision)
    else:
        grads = torch.ops.scm.attention_jvp_bwd(*args)
    return _single_key_zero(grads, (0, 1, 3, 4)) if args[3].shape[2] == 1 else grads


def out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An empty (B, Hq, Nq, Dv) output stored as (B, Nq, Hq, Dv) (torch's flash-attention layout)."""
    B, H, N, _ = q.shape
    return q.new_empty((B, N, H, v.shape[-1])).transpose(1, 2)


def stats(q: torch.Tensor) -> torch.Tensor:
    """An empty per-row statistic (lse, mu): (B, Hq, Nq) float32 (float64 for float64 q: the cpu kernels)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape[:3], dtype=dtype)


def grads_like(*xs):
    """Empty gradients shaped like xs (None for None), in their layouts (what the backward kernels return)."""
    return tuple(None if x is None else torch.empty_like(x) for x in xs)


def _detached(tensors):
    return tuple(x.detach() if x is not None else None for x in tensors)


def reference_backward(grad_out, q, k, v, mask, is_causal, scale):
    """(A26) in differentiable plain PyTorch: (dq, dk, dv), for a backward that is itself
    differentiated (double backward, forward-over-reverse): autograd and forward-mode AD see every
    operation. Materializes the (B, Hq, Nq, Nk) probabilities (O(N^2) memory), in fp32 (fp64 for
    fp64 inputs)."""
    from scm_kernels.attention import reference

    f = torch.promote_types(q.dtype, torch.float32)
    Hq, Hkv = q.shape[1], k.shape[1]
    qf, kf, vf, go = q.to(f), k.to(f), v.to(f), grad_out.to(f)
    p = reference.softmax(reference.logits(qf, kf, mask, is_causal, scale, Hq != Hkv))
    kk, vv = reference.expand_kv(kf, Hq), reference.expand_kv(vf, Hq)
    dp = go @ vv.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = scale * (ds @ kk)
    dk = scale * (ds.transpose(-1, -2) @ qf)
    dv = p.transpose(-1, -2) @ go
    if Hq != Hkv:  # query head h reads kv head h // G: sum each group
        dk, dv = (x.unflatten(1, (Hkv, Hq // Hkv)).sum(2) for x in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Plain:
    """The (B, Hq, Nq, Nk) quantities of one attention_jvp call in differentiable plain PyTorch, in fp32
    (fp64 for fp64 inputs), for the second-order paths of AttentionJvpFunction (O(N^2) memory, only
    there): P, the logit tangent s' = lambda (q' k^T + q k'^T) (A24) and mu = rowsum(P s'), with
    k, v and their tangents expanded to the query heads (GQA). Absent tangents stay None."""

    def __init__(self, q, k, v, tq, tk, tv, mask, is_causal, scale):
        from scm_kernels.attention import reference

        self.f = torch.promote_types(q.dtype, torch.float32)
        self.Hq, self.Hkv, self.scale = q.shape[1], k.shape[1], scale
        self.q, self.tq = self.lift(q), self.lift(tq)
        self.k, self.v, self.tk, self.tv = (self.lift(x, True) for x in (k, v, tk, tv))
        self.p = reference.softmax(reference.logits(self.q, self.lift(k), mask, is_causal, scale,
                                                    self.Hq != self.Hkv))
        self.sd = self.logit_tangent(self.tq, self.tk)
        self.mu = None if self.sd is None else (self.p * self.sd).sum(-1, keepdim=True)

    def lift(self, x, expand=False):
        """x in the working dtype; k / v-shaped tensors (expand) repeated to the query heads."""
        from scm_kernels.attention import reference

        if x is None:
            return None
        x = x.to(self.f)
        return reference.expand_kv(x, self.Hq) if expand else x

    def logits_of(self, *pairs):
        """lambda sum a b^T over the (a, b) pairs whose factors are both present, or None."""
        terms = [a @ b.transpose(-1, -2) for a, b in pairs if a is not None and b is not None]
        return None if not terms else self.scale * sum(terms)

    def logit_tangent(self, tq, tk):
        """lambda (tq k^T + q tk^T) over the terms present, or None."""
        return self.logits_of((tq, self.k), (self.q, tk))

    def reduce_kv(self, x):
        """A gradient w.r.t. an expanded k / v (or tangent) summed back over each GQA group."""
        if x is None or self.Hq == self.Hkv:
            return x
        return x.unflatten(1, (self.Hkv, self.Hq // self.Hkv)).sum(2)


def _addmm(*terms):
    """The sum of the products a @ b over the pairs whose factors are both present, or None."""
    present = [a @ b for a, b in terms if a is not None and b is not None]
    return sum(present) if present else None


def reference_jvp_backward(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, mask, is_causal, scale):
    """(A27) in differentiable plain PyTorch: the gradients w.r.t. (q, k, v, tq, tk, tv) of a loss on
    (out, out_tangent), for a backward of attention_jvp that is itself differentiated (double backward,
    torch.func.grad of torch.func.grad, torch.func.jvp over torch.func.grad). With g = dL/dO',
    nu = g.O, Delta' = dO.O + g.O' per row:
        ds' = P (g v^T - nu),  ds = P (dO v^T + g v'^T - Delta') + ds' (s' - mu)
        dv = P^T dO + (P (s' - mu))^T g,  dv' = P^T g
        dq = lambda (ds k + ds' k'),  dq' = lambda ds' k
        dk = lambda (ds^T q + ds'^T q'),  dk' = lambda ds'^T q
    (the kernels' formulas, csrc/cpu/attention.cpp). Materializes (B, Hq, Nq, Nk) tensors: O(N^2)
    memory. A None gradient or tangent is zero; the gradient of an absent tangent is None."""
    if grad_out_tangent is None:
        return (*reference_backward(grad_out, q, k, v, mask, is_causal, scale), None, None, None)
    a = _Plain(q, k, v, tq, tk, tv, mask, is_causal, scale)
    p, sd, f = a.p, a.sd, a.f
    pt = p.transpose(-1, -2)
    g = grad_out_tangent.to(f)
    go = None if grad_out is None else grad_out.to(f)
    pe = None if sd is None else p * (sd - a.mu)  # P (s' - mu)
    out = p @ a.v
    out_t = _addmm((pe, a.v), (p, a.tv))
    nu = (g * out).sum(-1, keepdim=True)
    delta = (g * out_t).sum(-1, keepdim=True) if out_t is not None else torch.zeros_like(nu)
    if go is not None:
        delta = delta + (go * out).sum(-1, keepdim=True)
    vt = a.v.transpose(-1, -2)
    dsd = p * (g @ vt - nu)
    x = _addmm((go, vt), (g, None if a.tv is None else a.tv.transpose(-1, -2)))
    ds = p * ((0.0 if x is None else x) - delta)
    if sd is not None:
        ds = ds + dsd * (sd - a.mu)
    dv = _addmm((pt, go), (None if pe is None else pe.transpose(-1, -2), g))
    dv = torch.zeros_like(a.v) if dv is None else dv
    dsT, dsdT = ds.transpose(-1, -2), dsd.transpose(-1, -2)
    dq = a.scale * _addmm((ds, a.k), (dsd, a.tk))
    dk = a.scale * _addmm((dsT, a.q), (dsdT, a.tq))
    dtq = None if tq is None else a.scale * (dsd @ a.k)
    dtk = None if tk is None else a.scale * (dsdT @ a.q)
    dtv = None if tv is None else pt @ g
    grads = (dq, a.reduce_kv(dk), a.reduce_kv(dv), dtq, a.reduce_kv(dtk), a.reduce_kv(dtv))
    return tuple(None if d is None else d.to(like.dtype) for d, like in zip(grads, (q, k, v, tq, tk, tv)))


def reference_jvp_jvp(q, k, v, tq, tk, tv, dq, dk, dv, dtq, dtk, dtv, mask, is_causal, scale):
    """The forward-mode derivative of attention_jvp's (out, out_tangent) along (dq, dk, dv, dtq, dtk, dtv)
    (a tangent of a tangent: torch.func.jvp over torch.func.grad of a loss on attention_jvp, nested
    JVPs), in plain PyTorch from (A24) differentiated once more:
        ds = lambda (dq k^T + q dk^T),  dP = P (ds - rowsum(P ds))
        ds' = lambda (dq' k^T + q' dk^T + dq k'^T + q dk'^T),  dmu = rowsum(dP s' + P ds')
        d out = dP v + P dv
        d out' = (dP (s' - mu) + P (ds' - dmu)) v + P (s' - mu) dv + dP v' + P dv'
    None tangents are zero. O(N^2) memory."""
    a = _Plain(q, k, v, tq, tk, tv, mask, is_causal, scale)
    f, p = a.f, a.p
    dq_, dtq_ = a.lift(dq), a.lift(dtq)
    dk_, dv_, dtk_, dtv_ = (a.lift(x, True) for x in (dk, dv, dtk, dtv))
    ds = a.logit_tangent(dq_, dk_)
    dp = None if ds is None else p * (ds - (p * ds).sum(-1, keepdim=True))
    d_out = _addmm((dp, a.v), (p, dv_))
    dsd = a.logits_of((dtq_, a.k), (a.q, dtk_), (a.tq, dk_), (dq_, a.tk))
    inner_ = None  # dP (s' - mu) + P (ds' - dmu)
    if dp is not None and a.sd is not None:
        inner_ = dp * (a.sd - a.mu) - p * (dp * a.sd).sum(-1, keepdim=True)
    if dsd is not None:
        t = p * (dsd - (p * dsd).sum(-1, keepdim=True))
        inner_ = t if inner_ is None else inner_ + t
    pe = None if a.sd is None else p * (a.sd - a.mu)
    d_out_t = _addmm((inner_, a.v), (pe, dv_), (dp, a.tv), (p, dtv_))
    zero = q.new_zeros(q.shape[:3] + v.shape[-1:], dtype=f)
    d_out = zero if d_out is None else d_out
    d_out_t = zero if d_out_t is None else d_out_t
    return d_out.to(v.dtype), d_out_t.to(v.dtype)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, mask, is_causal, scale, name, precision):
        return _fwd(name, q, k, v, mask, is_causal, scale, precision=precision)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale, name, precision = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.save_for_forward(q, k, v, out, lse, mask)
        ctx.consts = (bool(is_causal), float(scale), name, precision)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        is_causal, scale, name, precision = ctx.consts
        if backward_is_differentiated(ctx, grad_out):
            q, k, v, _, _, mask = ctx.saved_tensors
            return *reference_backward(grad_out, q, k, v, mask, is_causal, scale), None, None, None, None, None
        q, k, v, out, lse, mask = _detached(ctx.saved_tensors)
        dq, dk, dv = _bwd(name, inner(grad_out.detach()), q, k, v, out, lse, mask, is_causal, scale,
                          precision=precision)
        return dq, dk, dv, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        saved = ctx.saved_tensors
        is_causal, scale, name, precision = ctx.consts
        tq, tk, tv = inner(tq), inner(tk), inner(tv)
        if torch.is_grad_enabled():
            # The tangent may be differentiated (a loss on a JVP taken with grad enabled; under
            # torch.func the inputs' requires_grad is hidden by the transform's wrappers): compute it
            # through the differentiable Function whose backward is (A27). sCM takes its JVP under
            # no_grad, which runs the cheaper tangent-only kernels below.
            q, k, v, _, _, mask = saved
            return AttentionJvpFunction.apply(q, k, v, tq, tk, tv, mask, is_causal, scale, name, precision)[1], None
        q, k, v, out, lse, mask = _detached(saved)
        if name == "triton":
            _, out_tangent, _, _ = _jvp(name, q, k, v, tq, tk, tv, mask, is_causal, scale, precision=precision)
        else:
            out_tangent, _ = torch.ops.scm.attention_jvp_tangent(q, k, v, tq, tk, tv, out, lse, mask, is_causal,
                                                                  scale)
        return out_tangent, None


class AttentionJvpFunction(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, is_causal, scale, name, precision):
        return _jvp(name, q, k, v, tq, tk, tv, mask, is_causal, scale, precision=precision)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, mask, is_causal, scale, name, precision = inputs
        out, out_tangent, lse, mu = output
        ctx.mark_non_differentiable(lse, mu)
        ctx.set_materialize_grads(False)  # an unused output gives None: the kernel skips its work
        ctx.save_for_backward(q, k, v, tq, tk, tv, out, out_tangent, lse, mu, mask)
        ctx.save_for_forward(q, k, v, tq, tk, tv, mask)
        ctx.consts = (bool(is_causal), float(scale), name, precision)

    @staticmethod
    def backward(ctx, grad_out, grad_out_tangent, _grad_lse, _grad_mu):
        is_causal, scale, name, precision = ctx.consts
        if grad_out is None and grad_out_tangent is None:
            return (None,) * 11
        if backward_is_differentiated(ctx, grad_out, grad_out_tangent):
            q, k, v, tq, tk, tv, *_, mask = ctx.saved_tensors
            grads = reference_jvp_backward(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, mask, is_causal,
                                           scale)
            return (*grads, None, None, None, None, None)
        q, k, v, tq, tk, tv, out, out_tangent, lse, mu, mask = _detached(ctx.saved_tensors)
        grad_out, grad_out_tangent = _detached((grad_out, grad_out_tangent))
        grads = _jvp_bwd(name, inner(grad_out), inner(grad_out_tangent), q, k, v, tq, tk, tv, out, out_tangent,
                         lse, mu, mask, is_causal, scale, precision=precision)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dtq, dtk, dtv, *_):
        """The tangents of (out, out_tangent) along tangents of the six inputs: a second-order forward
        derivative (torch.func.jvp over torch.func.grad of a loss on attention_jvp, nested JVPs), in
        plain PyTorch (reference_jvp_jvp, O(N^2) memory). lse and mu have none."""
        q, k, v, tq, tk, tv, mask = ctx.saved_tensors
        is_causal, scale, _, _ = ctx.consts
        d_out, d_out_t = reference_jvp_jvp(q, k, v, tq, tk, tv, dq, dk, dv, dtq, dtk, dtv, mask, is_causal,
                                           scale)
        return d_out, d_out_t, None, None


class AttentionDualFunction(AttentionJvpFunction):
    """AttentionJvpFunction as attention's forward-mode rule under forward_ad (the public function's
    _fused_jvp): its tq, tk, tv are the tangents of q, k, v at the current forward-AD level, not
    independent inputs. A backward that forward-mode AD differentiates (forward_ad dual tensors with a
    create_graph backward) must then see q + eps tq, k + eps tk, v + eps tv: it runs (A27) in plain
    PyTorch on the dual tensors rebuilt from them. Everything else is AttentionJvpFunction's."""

    @staticmethod
    def backward(ctx, grad_out, grad_out_tangent, _grad_lse, _grad_mu):
        if (fwAD._current_level >= 0 and not torch._C._are_functorch_transforms_active()
                and (grad_out is not None or grad_out_tangent is not None)
                and backward_is_differentiated(ctx, grad_out, grad_out_tangent)):
            q, k, v, tq, tk, tv, *_, mask = ctx.saved_tensors
            is_causal, scale, _, _ = ctx.consts
            q, k, v = (x if t is None or fwAD.unpack_dual(x).tangent is not None else fwAD.make_dual(x, t)
                       for x, t in ((q, tq), (k, tk), (v, tv)))
            grads = reference_jvp_backward(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, mask, is_causal,
                                           scale)
            return (*grads, None, None, None, None, None)
        return AttentionJvpFunction.backward(ctx, grad_out, grad_out_tangent, _grad_lse, _grad_mu)


class AttentionPrimalJvpFunction(AttentionJvpFunction):
    """attention_jvp(..., differentiable_tangent=False): the same fused pass (A25) as
    AttentionJvpFunction, but only the primal is differentiable, so the backward is `attention`'s
    (A26) and only what it needs is saved (q, k, v, out, lse: no tangents). For a JVP pass whose
    primal is also the gradient pass (sCM with F^- = F, scm.SCMLoss(passes="merged"))."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, mask, is_causal, scale, name, precision = inputs
        out, out_tangent, lse, mu = output
        ctx.mark_non_differentiable(out_tangent, lse, mu)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, mask)  # AttentionFunction's saved tensors and consts
        ctx.save_for_forward(q, k, v, out, lse, mask)
        ctx.consts = (bool(is_causal), float(scale), name, precision)

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        """The tangent of out (attention's jvp rule on the same saved tensors); out_tangent, lse and mu
        are not differentiable here."""
        return AttentionFunction.jvp(ctx, dq, dk, dv)[0], None, None, None

    @staticmethod
    def backward(ctx, grad_out, _grad_out_tangent, _grad_lse, _grad_mu):
        if grad_out is None:
            return (None,) * 11
        return AttentionFunction.backward(ctx, grad_out, None)[:3] + (None,) * 8


# Fake (meta) implementations so that torch.compile can trace the schema ops (absent from an
# extension built before attention existed: then the cpu backend reports the op missing).
if backend.extension_available() and hasattr(torch.ops.scm, "attention_fwd"):

    @torch.library.register_fake("scm::attention_fwd")
    def _attention_fwd_fake(q, k, v, mask, is_causal, scale):
        return out_like(q, v), stats(q)

    @torch.library.register_fake("scm::attention_bwd")
    def _attention_bwd_fake(grad_out, q, k, v, out, lse, mask, is_causal, scale):
        return grads_like(q, k, v)

    @torch.library.register_fake("scm::attention_jvp")
    def _attention_jvp_fake(q, k, v, tq, tk, tv, mask, is_causal, scale):
        return out_like(q, v), out_like(q, v), stats(q), stats(q)

    if hasattr(torch.ops.scm, "attention_jvp_tangent"):

        @torch.library.register_fake("scm::attention_jvp_tangent")
        def _attention_jvp_tangent_fake(q, k, v, tq, tk, tv, out, lse, mask, is_causal, scale):
            return out_like(q, v), stats(q)

    @torch.library.register_fake("scm::attention_jvp_bwd")
    def _attention_jvp_bwd_fake(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse, mu, mask,
                                is_causal, scale):
        return grads_like(q, k, v, tq, tk, tv)
