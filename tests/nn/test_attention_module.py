"""scm_kernels.nn.Attention and AttentionProcessor (diffusers): layout, math, kernels vs reference.

- The module's math against a naive float64 attention written from its weights (all variants).
- q/k/v reach scm_kernels.attention as views of the projection output, and the kernels' output
  reaches the output projection as a view (no copies).
- The module on each kernel backend equals the module on backend="reference": forward, gradients
  and torch.func.jvp tangents, by the tolerance rule of tests/conftest.py in float32, within 1e-10
  in float64 on the cpu backend.
- Whole models (issue 3): the JVP of a small transformer block (LayerNorm, self- and cross-attention,
  MLP, residuals) and of a small U-Net attention block (conv, GroupNorm, attention over H*W,
  residual) built on Attention equals the JVP of the same model on the reference; the gradient
  after a JVP pass equals the gradient without it.
- diffusers (skipped when it is not installed): the processor gives diffusers' own numbers on
  Attention layers with every feature AttnProcessor2_0 supports and on tiny UNet2DModel,
  UNet2DConditionModel and DiTTransformer2DModel, and makes them JVP-able.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import scm_kernels
from scm_kernels.nn import Attention, AttentionProcessor
from scm_kernels.nn import attention as nn_attention
from tests.conftest import assert_rule, max_err

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")


def _kernel(kernel_backend):
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel: CUDA tensors run on the triton backend")
    return name, device


def _with_backend(model: nn.Module, name: str, dtype=None, device="cpu") -> nn.Module:
    """A copy of model whose Attention layers (and AttentionProcessors) run on backend `name`."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.backend = name
        proc = getattr(mod, "processor", None)
        if isinstance(proc, AttentionProcessor):
            mod.set_processor(AttentionProcessor(backend=name))
    return m


# ---------------------------------------------------------------------------------------------
# The module's math: a naive float64 attention from the module's weights
# ---------------------------------------------------------------------------------------------
def naive(m: Attention, x, context=None, attn_mask=None):
    """Attention written out head by head from m's weights (no views, no fused ops)."""
    Hq, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim

    def tokens(t):
        return t.flatten(2).transpose(1, 2) if t.dim() == 4 else t

    tok = tokens(x)
    if m.to_qkv is not None:
        w, b = m.to_qkv.weight, m.to_qkv.bias
        wq, wk, wv = w[:Hq * D], w[Hq * D:(Hq + Hkv) * D], w[(Hq + Hkv) * D:]
        bq, bk, bv = (None,) * 3 if b is None else (b[:Hq * D], b[Hq * D:(Hq + Hkv) * D], b[(Hq + Hkv) * D:])
        src = tok
    else:
        wq, bq = m.to_q.weight, m.to_q.bias
        w, b = m.to_kv.weight, m.to_kv.bias
        wk, wv = w[:Hkv * D], w[Hkv * D:]
        bk, bv = (None, None) if b is None else (b[:Hkv * D], b[Hkv * D:])
        src = tok if context is None else tokens(context)
    q, k, v = F.linear(tok, wq, bq), F.linear(src, wk, bk), F.linear(src, wv, bv)
    outs = []
    for h in range(Hq):
        hk = h // (Hq // Hkv)
        qh, kh, vh = q[..., h * D:(h + 1) * D], k[..., hk * D:(hk + 1) * D], v[..., hk * D:(hk + 1) * D]
        if m.norm_q is not None:
            qh = qh / torch.sqrt(qh.pow(2).mean(-1, keepdim=True) + m.norm_q.eps) * m.norm_q.weight
            kh = kh / torch.sqrt(kh.pow(2).mean(-1, keepdim=True) + m.norm_k.eps) * m.norm_k.weight
        s = m.scale * qh @ kh.transpose(-1, -2)
        if m.is_causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).tril().logical_not(), -math.inf)
        if attn_mask is not None:
            mh = attn_mask if attn_mask.dim() < 3 else attn_mask[:, h if attn_mask.shape[1] > 1 else 0]
            s = s.masked_fill(~mh, -math.inf) if mh.dtype == torch.bool else s + mh
        outs.append(torch.softmax(s, -1) @ vh)
    y = F.linear(torch.cat(outs, -1), m.to_out.weight, m.to_out.bias)
    return y.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:]) if x.dim() == 4 else y


# name -> (constructor kwargs, x shape, context shape or None, mask kind)
CASES = {
    "map-self": (dict(dim=8, num_heads=2), (2, 8, 3, 5), None, None),
    "tokens-self": (dict(dim=12, head_dim=4), (2, 7, 12), None, None),
    "tokens-cross": (dict(dim=8, num_heads=2, context_dim=6), (2, 5, 8), (2, 9, 6), None),
    "map-cross-map-context": (dict(dim=8, num_heads=4, context_dim=6), (1, 8, 2, 3), (1, 6, 3, 3), None),
    "cross-no-context": (dict(dim=8, num_heads=2, context_dim=8), (2, 6, 8), None, None),
    "gqa-qknorm": (dict(dim=16, num_heads=4, num_kv_heads=2, qk_norm="rmsnorm"), (2, 6, 16), None, None),
    "mqa-cross": (dict(dim=12, num_heads=3, num_kv_heads=1, context_dim=5), (2, 4, 12), (2, 7, 5), None),
    "wide-heads-out-dim": (dict(dim=6, num_heads=2, head_dim=5, out_dim=4, qkv_bias=False, out_bias=False),
                           (2, 5, 6), None, None),
    "causal": (dict(dim=8, num_heads=2, is_causal=True), (2, 6, 8), None, None),
    "bool-mask": (dict(dim=8, num_heads=2, context_dim=8), (2, 5, 8), (2, 7, 8), "bool"),
    "float-mask-per-head": (dict(dim=8, num_heads=2), (1, 5, 8), None, "float"),
    "scale": (dict(dim=8, num_heads=2, scale=0.7), (2, 4, 8), None, None),
}


def make(case: str, dtype=torch.float64, seed=0):
    kw, xs, cs, mask_kind = CASES[case]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = Attention(**kw).to(dtype)
    with torch.no_grad():  # non-trivial QK-norm gains
        for mod in (m.norm_q, m.norm_k):
            if mod is not None:
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g, dtype=dtype))
    x = torch.randn(xs, generator=g, dtype=dtype)
    context = None if cs is None else torch.randn(cs, generator=g, dtype=dtype)
    def length(t):
        return t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[1]

    Nq = length(x)
    Nk = Nq if context is None else length(context)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(x.shape[0], 1, Nq, Nk, generator=g) > 0.4
        mask[0, 0, 1] = False  # a fully masked query row: output 0
    elif mask_kind == "float":
        mask = torch.randn(x.shape[0], m.num_heads, Nq, Nk, generator=g, dtype=dtype)
    return m, x, context, mask


@pytest.mark.reference
@pytest.mark.parametrize("case", list(CASES))
def test_module_math_matches_naive(case):
    m, x, context, mask = make(case)
    m.backend = "reference"
    y = m(x, context, mask)
    out_dim = m.out_dim
    assert y.shape == ((x.shape[0], out_dim, *x.shape[2:]) if x.dim() == 4 else (*x.shape[:2], out_dim))
    want = naive(m, x, context, mask)
    if mask is not None and mask.dtype == torch.bool:  # fully masked rows: 0 through the output projection
        dead = ~mask.any(-1)  # (B, 1, Nq)
        bias = torch.zeros(out_dim, dtype=x.dtype) if m.to_out.bias is None else m.to_out.bias
        want = torch.where(dead[:, 0, :, None], bias, want)
    assert max_err(y, want) < 1e-12


@pytest.mark.reference
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_map_output_keeps_memory_format(fmt):
    m = Attention(8, 2, backend="reference").double()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    assert max_err(y, m(x.contiguous())) < 1e-13


@pytest.mark.reference
@pytest.mark.parametrize("context_dim", [None, 6])
def test_no_copies_between_projections_and_kernels(monkeypatch, context_dim):
    """q/k/v reach attention as (B, N, H, D) memory of the projection outputs; the kernels'
    (B, Nq, H, D) output reaches the output projection as a view."""
    m = Attention(8, 2, num_kv_heads=1, context_dim=context_dim)
    x, c = torch.randn(2, 5, 8), (None if context_dim is None else torch.randn(2, 7, 6))
    seen = {}

    def spy(q, k, v, attn_mask, is_causal, scale, enable_gqa, *, backend, precision):
        seen["qkv"] = (q, k, v)
        B, H, N, _ = q.shape
        out = q.new_empty(B, N, H, v.shape[-1]).transpose(1, 2)  # the kernels' layout
        out.copy_(scm_kernels.attention(q, k, v, enable_gqa=enable_gqa, backend="reference"))
        seen["out"] = out
        return out

    monkeypatch.setattr(nn_attention, "attention", spy)
    projected = {}
    hooks = [lin.register_forward_hook(lambda mod, i, o, key=key: projected.__setitem__(key, o))
             for key, lin in (("qkv", m.to_qkv), ("q", m.to_q), ("kv", m.to_kv)) if lin is not None]
    hooks.append(m.to_out.register_forward_pre_hook(lambda mod, i: projected.__setitem__("out_in", i[0])))
    m(x, c)
    for h in hooks:
        h.remove()
    q, k, v = seen["qkv"]
    for t in (q, k, v):
        assert t.stride(-1) == 1 and t.stride(2) > t.stride(1)  # (B, N, H, D) memory as (B, H, N, D)
    if context_dim is None:
        base = projected["qkv"]
        assert q.data_ptr() == base.data_ptr()
        assert k.data_ptr() == base.data_ptr() + 2 * 4 * base.element_size()
    else:
        assert q.data_ptr() == projected["q"].data_ptr()
        assert k.data_ptr() == projected["kv"].data_ptr()
        assert v.data_ptr() == projected["kv"].data_ptr() + 4 * projected["kv"].element_size()
    assert projected["out_in"].data_ptr() == seen["out"].data_ptr()


@pytest.mark.reference
def test_zero_init_out():
    m = Attention(8, 2, zero_init_out=True, backend="reference")
    x = torch.randn(2, 8, 3, 3)
    y = m(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.square().add(y).sum().backward()
    assert m.to_out.weight.grad.abs().sum() > 0 and m.to_out.bias.grad.abs().sum() > 0
    assert float(Attention(8, 2).to_out.weight.detach().abs().sum()) > 0


@pytest.mark.reference
def test_errors():
    op = "scm_kernels.nn.Attention"
    bad = [
        (dict(dim=8), ValueError, "give num_heads or head_dim"),
        (dict(dim=8, num_heads=3), ValueError, "divisible by num_heads"),
        (dict(dim=8, head_dim=3), ValueError, "divisible by head_dim"),
        (dict(dim=8, num_heads=0), ValueError, "num_heads must be >= 1"),
        (dict(dim=8, num_heads=4, num_kv_heads=3), ValueError, "multiple of num_kv_heads"),
        (dict(dim=8, num_heads=2, qk_norm="layernorm"), ValueError, "qk_norm must be one of"),
        (dict(dim=8, num_heads=2, backend="gpu"), ValueError, "backend"),
        (dict(dim=8, num_heads=2, precision="fp8"), ValueError, "precision must be one of"),
        (dict(dim=8.0, num_heads=2), TypeError, "dim must be an int"),
        (dict(dim=8, num_heads=2, is_causal=1), TypeError, "is_causal must be a bool"),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            Attention(**kw)
    self_attn = Attention(8, 2, backend="reference")
    cross = Attention(8, 2, context_dim=6, backend="reference")
    calls = [
        (lambda: self_attn(torch.randn(2, 8)), ValueError, r"must be \(B, N, C\) tokens or a \(B, C, H, W\)"),
        (lambda: self_attn(torch.randn(2, 4, 9)), ValueError, "must have C = 8 features"),
        (lambda: self_attn(torch.randn(2, 9, 2, 2)), ValueError, "must have C = 8 channels"),
        (lambda: self_attn([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: self_attn(torch.randn(2, 4, 8), torch.randn(2, 3, 8)), ValueError,
         "built for self-attention"),
        (lambda: cross(torch.randn(2, 4, 8)), ValueError, "needs a context"),
        (lambda: cross(torch.randn(2, 4, 8), torch.randn(2, 3, 5)), ValueError, "must have C = 6 features"),
        (lambda: cross(torch.randn(2, 4, 8), torch.randn(3, 3, 6)), ValueError, "context has batch size 3"),
        (lambda: cross(torch.randn(2, 4, 8), torch.randn(2, 3, 6), torch.ones(5, 5, dtype=torch.bool)),
         ValueError, "does not broadcast"),
    ]
    for call, exc, msg in calls:
        with pytest.raises(exc, match=msg) as info:
            call()
        assert "scm_kernels" in str(info.value), op


# ---------------------------------------------------------------------------------------------
# Kernel backends vs the reference: the module, and whole models
# ---------------------------------------------------------------------------------------------
class _CompositeLayerNorm(nn.LayerNorm):
    """LayerNorm in elementwise ops and reductions, whose JVP keeps the input's dtype."""

    def forward(self, x):
        m = x.mean(-1, keepdim=True)
        v = (x - m).square().mean(-1, keepdim=True)
        return (x - m) * torch.rsqrt(v + self.eps) * self.weight + self.bias


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention (GQA, QK norm), cross-attention, GELU MLP."""

    def __init__(self, dim=16, heads=4, context_dim=6):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, num_kv_heads=2, qk_norm=True)
        self.cross = Attention(dim, heads, context_dim=context_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(2 * dim, dim))

    def forward(self, x, context):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class UNetAttentionBlock(nn.Module):
    """A U-Net stage with attention: conv, GroupNorm, self-attention over the H*W positions, residual."""

    def __init__(self, channels=8, groups=4, heads=2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, heads)
        self.out_norm = nn.GroupNorm(groups, channels)  # the next block's norm reads the attention output

    def forward(self, x):
        h = self.conv(x)
        h = h + self.attn(self.norm(h))
        return self.out_norm(F.silu(h))


def _seeded(model_cls, seed=0, **kw):
    torch.manual_seed(seed)
    m = model_cls(**kw)
    with torch.no_grad():  # non-trivial norm parameters
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


MODELS = {
    # name -> (model factory, input shapes)
    "transformer-block": (lambda: _seeded(TransformerBlock), [(2, 7, 16), (2, 5, 6)]),
    "unet-attention-block": (lambda: _seeded(UNetAttentionBlock), [(2, 8, 3, 4)]),
    "module-map-self": (lambda: make("map-self")[0], [(2, 8, 3, 5)]),
    "module-mqa-cross": (lambda: make("mqa-cross")[0], [(2, 4, 12), (2, 7, 5)]),
    "module-causal": (lambda: make("causal")[0], [(2, 6, 8)]),
}


def _inputs(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return xs, ts


def _everything(model, name, dtype, xs, ts, gy_seed=2, device="cpu"):
    """(output, jvp primal, jvp tangent, grads w.r.t. inputs and parameters) of model on backend name,
    on `device`; returned on the CPU."""
    m = _with_backend(model, name, dtype, device)
    xs = [x.to(device, dtype) for x in xs]
    ts = [t.to(device, dtype) for t in ts]
    y = m(*xs)
    y_j, t_j = torch.func.jvp(m, tuple(xs), tuple(ts))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)
    gy = gy.to(device, dtype)
    xg = [x.detach().requires_grad_() for x in xs]
    grads = torch.autograd.grad((m(*xg) * gy).sum(), xg + list(m.parameters()))
    return [r.detach().cpu() for r in (y, y_j, t_j, *grads)]


WHAT = ["forward", "jvp primal", "jvp tangent", "grads"]


@pytest.mark.parametrize("model", list(MODELS))
def test_kernels_match_reference(kernel_backend, model):
    """Forward, torch.func.jvp (primal, tangent) and gradients of the model on a kernel backend
    equal those on the reference: the tolerance rule in float32; within 1e-10 in float64 (cpu)."""
    name, device = _kernel(kernel_backend)
    factory, shapes = MODELS[model]
    net = factory().double()
    xs, ts = _inputs(shapes)
    ref64 = _everything(net, "reference", torch.float64, xs, ts)
    ref32 = _everything(net, "reference", torch.float32, xs, ts)
    ours32 = _everything(net, name, torch.float32, xs, ts, device=device)
    for i, (a, r, t) in enumerate(zip(ours32, ref64, ref32)):
        assert_rule(a, r, t, torch.float32, what=f"{model} {WHAT[min(i, 3)]} #{i}")
    if name == "cpu":
        ours64 = _everything(net, name, torch.float64, xs, ts)
        for i, (a, r) in enumerate(zip(ours64, ref64)):
            err = max_err(a, r)
            assert err <= 1e-10, f"{model} float64 {WHAT[min(i, 3)]} #{i}: {err:.3e}"


def test_forward_ad_dual_tensors(backend):
    """torch.autograd.forward_ad dual tensors through the module give torch.func.jvp's tangent."""
    name, device = backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    m = _with_backend(make("mqa-cross")[0], name, torch.float32, device)
    (x, c), (tx, tc) = ([t.to(device, torch.float32) for t in ts]
                        for ts in _inputs(MODELS["module-mqa-cross"][1]))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, tx), fwAD.make_dual(c, tc))).tangent
    assert torch.equal(tangent, torch.func.jvp(m, (x, c), (tx, tc))[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(kernel_backend, dtype):
    """The transformer block in fp16/bf16 on a kernel backend: output and JVP tangent by the
    tolerance rule (PyTorch's own error: the reference backend in the same dtype)."""
    name, device = _kernel(kernel_backend)
    factory, shapes = MODELS["transformer-block"]
    net = factory().double()
    if device != "cpu":
        # torch's CUDA LayerNorm gives float32 tangents for fp16/bf16 inputs (seen with torch 2.11), which
        # the next Linear's JVP refuses: the same block with a composite LayerNorm
        for n in ("norm1", "norm2", "norm3"):
            ln = getattr(net, n)
            setattr(net, n, _CompositeLayerNorm(ln.normalized_shape, ln.eps).double())
            getattr(net, n).load_state_dict(ln.state_dict())
    xs, ts = _inputs(shapes)

    def run(bk, dt, dev="cpu"):
        m = _with_backend(net, bk, dt, dev)
        out = torch.func.jvp(m, tuple(x.to(dev, dt) for x in xs), tuple(t.to(dev, dt) for t in ts))
        return [o.cpu() for o in out]

    for what, o, r, t in zip(("output", "tangent"), run(name, dtype, device), run("reference", torch.float64),
                             run("reference", dtype)):
        assert_rule(o, r, t, dtype, what=f"{dtype} {what}")


@pytest.mark.parametrize("model", ["transformer-block", "unet-attention-block"])
def test_grad_after_jvp_pass_equals_plain_grad(backend, model):
    """sCM's step: a no-grad JVP pass, then a gradient pass. The JVP pass leaves the gradient
    unchanged (bitwise), and the primal of a JVP taken with grad enabled has the plain gradient."""
    name, device = backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    factory, shapes = MODELS[model]
    m = _with_backend(factory(), name, torch.float32, device)
    xs, ts = _inputs(shapes)
    xs, ts = [x.to(device, torch.float32) for x in xs], [t.to(device, torch.float32) for t in ts]
    params = list(m.parameters())

    def grads(fn):
        return torch.autograd.grad(fn().square().sum(), params)

    g0 = grads(lambda: m(*xs))
    with torch.no_grad():
        torch.func.jvp(m, tuple(xs), tuple(ts))
    g1 = grads(lambda: m(*xs))
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    g2 = grads(lambda: torch.func.jvp(m, tuple(xs), tuple(ts))[0])
    # On a GPU the JVP kernel's primal and the forward kernel's use different tiles, hence a different
    # summation order (and cuDNN picks its convolution algorithms per call): a few float32 ulps more.
    rel = 1e-6 if device == "cpu" else 1e-5
    for a, b in zip(g0, g2):
        assert max_err(a, b) <= rel * max(1.0, float(a.abs().max()))


@pytest.mark.cpu
@pytest.mark.skipif(not scm_kernels.backend.extension_available(), reason="scm_kernels._C not built")
@pytest.mark.parametrize("model", ["transformer-block", "unet-attention-block"])
def test_model_compiles(model):
    """torch.compile (aot_eager, fullgraph) of a model on Attention: the same output and gradients
    as eager, bitwise (the same kernels run)."""
    factory, shapes = MODELS[model]
    m = _with_backend(factory(), "cpu", torch.float32)
    xs = [x.float() for x in _inputs(shapes)[0]]
    torch._dynamo.reset()
    results = []
    for f in (m, torch.compile(m, backend="aot_eager", fullgraph=True)):
        y = f(*xs)
        results.append([y.detach(), *torch.autograd.grad(y.square().sum(), list(m.parameters()))])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.reference
def test_jvp_matches_finite_differences():
    """The reference module's tangent is the derivative (central differences in float64), so the
    kernel-vs-reference comparisons above compare against the true JVP."""
    net = _with_backend(_seeded(TransformerBlock), "reference", torch.float64)
    xs, ts = _inputs(MODELS["transformer-block"][1])
    _, tangent = torch.func.jvp(net, tuple(xs), tuple(ts))
    h = 1e-6
    fd = (net(*[x + h * t for x, t in zip(xs, ts)]) - net(*[x - h * t for x, t in zip(xs, ts)])) / (2 * h)
    assert max_err(tangent, fd) < 1e-7


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------
@pytest.mark.reference
def test_importing_nn_does_not_need_diffusers():
    code = ("import sys, scm_kernels.nn as n; n.Attention; n.AttentionProcessor; "
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.reference
def test_processor_without_diffusers_raises(monkeypatch):
    monkeypatch.setattr(nn_attention, "_diffusers_available", lambda: False)
    with pytest.raises(ImportError, match="needs diffusers installed"):
        AttentionProcessor()


def _diffusers_attn(seed=0, **kw):
    from diffusers.models.attention_processor import Attention as DAttention

    torch.manual_seed(seed)
    a = DAttention(**kw).double().eval()
    with torch.no_grad():
        for p in a.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return a


# name -> (diffusers Attention kwargs, hidden_states shape, encoder_hidden_states shape, call extras)
DIFFUSERS_LAYERS = {
    "self-tokens": (dict(query_dim=8, heads=2, dim_head=4, bias=True), (2, 6, 8), None, {}),
    "unet-style-4d": (dict(query_dim=8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True,
                           rescale_output_factor=2.0, bias=True, eps=1e-6), (2, 8, 3, 3), None, {}),
    "spatial-norm": (dict(query_dim=32, heads=2, dim_head=4, spatial_norm_dim=3, residual_connection=True),
                     (1, 32, 4, 4), None, {"temb": (1, 3, 2, 2)}),  # SpatialNorm: 32 groups
    "cross-norm-cross-mask": (dict(query_dim=8, cross_attention_dim=6, heads=2, dim_head=3,
                                   cross_attention_norm="layer_norm"), (2, 5, 8), (2, 7, 6),
                              {"mask": (2, 7)}),
    "qk-rms-norm": (dict(query_dim=8, heads=2, dim_head=4, qk_norm="rms_norm", eps=1e-6), (2, 6, 8), None,
                    {}),
    "qk-layer-norm-cross": (dict(query_dim=8, cross_attention_dim=5, heads=4, dim_head=2,
                                 qk_norm="layer_norm"),
                            (1, 6, 8), (1, 3, 5), {}),
    "no-scale-qk": (dict(query_dim=8, heads=2, dim_head=4, scale_qk=False), (2, 5, 8), None, {}),
    "fused-self": (dict(query_dim=8, heads=2, dim_head=4, bias=True), (2, 5, 8), None, {"fuse": True}),
    "fused-cross": (dict(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4), (2, 5, 8), (2, 4, 6),
                    {"fuse": True}),
}


def _diffusers_case(case):
    kw, hs, es, extra = DIFFUSERS_LAYERS[case]
    a = _diffusers_attn(**kw)
    if extra.get("fuse"):
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        a.fuse_projections()
        a.set_processor(FusedAttnProcessor2_0())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(hs, generator=g, dtype=torch.float64)
    call = {}
    if es is not None:
        call["encoder_hidden_states"] = torch.randn(es, generator=g, dtype=torch.float64)
    if "temb" in extra:
        call["temb"] = torch.randn(extra["temb"], generator=g, dtype=torch.float64)
    if "mask" in extra:
        keep = torch.ones(extra["mask"], dtype=torch.float64)
        keep[0, -3:] = 0
        call["attention_mask"] = ((1 - keep) * -10000.0)[:, None, :]  # diffusers' additive (B, 1, Nk) bias
    return a, x, call


@needs_diffusers
@pytest.mark.reference
@pytest.mark.parametrize("case", list(DIFFUSERS_LAYERS))
def test_processor_matches_diffusers_processor(case):
    """float64: our processor (reference backend) gives the default processor's numbers."""
    a, x, call = _diffusers_case(case)
    want = a(x, **call)
    a.set_processor(AttentionProcessor(backend="reference"))
    got = a(x, **call)
    assert got.shape == want.shape
    assert max_err(got, want) < 1e-12


@needs_diffusers
@pytest.mark.reference
def test_processor_gqa_kv_heads():
    """kv_heads (which AttnProcessor2_0 mishandles) against the naive GQA attention."""
    a = _diffusers_attn(query_dim=8, heads=4, kv_heads=2, dim_head=2, bias=True)
    a.set_processor(AttentionProcessor(backend="reference"))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q = a.to_q(x).unflatten(-1, (4, 2)).transpose(1, 2)
    k = a.to_k(x).unflatten(-1, (2, 2)).transpose(1, 2).repeat_interleave(2, dim=1)
    v = a.to_v(x).unflatten(-1, (2, 2)).transpose(1, 2).repeat_interleave(2, dim=1)
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), -1) @ v
    want = a.to_out[0](o.transpose(1, 2).reshape(2, 5, 8))
    assert max_err(a(x), want) < 1e-12


@needs_diffusers
@pytest.mark.reference
def test_processor_errors():
    from diffusers.models.attention_processor import Attention as DAttention

    a = DAttention(query_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6)
    a.set_processor(AttentionProcessor(backend="reference"))
    with pytest.raises(NotImplementedError, match="added_kv_proj_dim"):
        a(torch.randn(1, 3, 8), encoder_hidden_states=torch.randn(1, 2, 6))
    with pytest.raises(TypeError, match="works on diffusers"):
        AttentionProcessor()(nn.Identity(), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="backend"):
        AttentionProcessor(backend="gpu")


@needs_diffusers
@pytest.mark.parametrize("case", ["unet-style-4d", "cross-norm-cross-mask", "qk-rms-norm", "fused-self"])
def test_processor_kernels_match_reference(kernel_backend, case):
    """A diffusers Attention layer with our processor on a kernel backend: forward and JVP equal
    the reference backend's (float32 by the tolerance rule)."""
    name, device = _kernel(kernel_backend)
    a, x, call = _diffusers_case(case)
    a.set_processor(AttentionProcessor())
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(bk, dtype, dev="cpu"):
        layer = _with_backend(a, bk, dtype, dev)
        kw = {k: v.to(dev, dtype) for k, v in call.items()}
        out = torch.func.jvp(lambda h: layer(h, **kw), (x.to(dev, dtype),), (tx.to(dev, dtype),))
        return [o.cpu() for o in out]

    ref64, ref32 = run("reference", torch.float64), run("reference", torch.float32)
    ours = run(name, torch.float32, device)
    for what, o, r, t in zip(("output", "tangent"), ours, ref64, ref32):
        assert_rule(o, r, t, torch.float32, what=f"{case} {what}")


def _tiny_diffusers_models():
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    t = torch.tensor([10.0, 500.0])
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    cond = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=12, attention_head_dim=2)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=3, out_channels=3,
                                num_layers=1, sample_size=8, patch_size=2, norm_num_groups=4)
    g = torch.Generator().manual_seed(4)
    text = torch.randn(2, 5, 12, generator=g)
    text_mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([0, 1])
    return {
        "UNet2DModel": (unet, lambda m, x: m(x, t).sample),
        "UNet2DConditionModel": (cond, lambda m, x: m(x, t, text.to(x.dtype),
                                                      encoder_attention_mask=text_mask.to(x.dtype)).sample),
        "DiTTransformer2DModel": (dit, lambda m, x: m(x, timestep=t, class_labels=labels).sample),
    }


def _set_processor(model, proc):
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(proc)  # diffusers' own entry point, where the model has it
    else:
        for mod in model.modules():
            if hasattr(mod, "set_processor"):
                mod.set_processor(proc)


@needs_diffusers
@pytest.mark.parametrize("which", ["UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"])
def test_tiny_diffusers_models(backend, which):
    """A tiny diffusers model with AttentionProcessor gives diffusers' own output, and its
    torch.func.jvp (which diffusers' processor cannot do) equals the reference's."""
    name, device = backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    if device != "cpu":
        pytest.skip("the diffusers models run on the CPU here; the kernels on CUDA are checked by the tests above")
    model, fn = _tiny_diffusers_models()[which]
    model.eval()
    g = torch.Generator().manual_seed(6)
    x, tx = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        want = fn(model, x)  # diffusers' default processors (SDPA), float32
        want64 = fn(copy.deepcopy(model).double(), x.double())
    _set_processor(model, AttentionProcessor(backend=name))
    layers = [m for m in model.modules() if hasattr(m, "set_processor")]
    assert layers and all(isinstance(m.processor, AttentionProcessor) for m in layers)
    y, ty = torch.func.jvp(lambda h: fn(model, h), (x,), (tx,))
    assert_rule(y, want64, want, torch.float32, what=f"{which} output vs diffusers' processor")
    ref64 = copy.deepcopy(model).double()
    _set_processor(ref64, AttentionProcessor(backend="reference"))
    y64, ty64 = torch.func.jvp(lambda h: fn(ref64, h), (x.double(),), (tx.double(),))
    ref32 = copy.deepcopy(model)
    _set_processor(ref32, AttentionProcessor(backend="reference"))
    _, ty32 = torch.func.jvp(lambda h: fn(ref32, h), (x,), (tx,))
    assert max_err(y64, want64) < 1e-10
    assert_rule(ty, ty64, ty32, torch.float32, what=f"{which} tangent")
