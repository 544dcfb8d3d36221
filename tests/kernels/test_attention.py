"""Tests of scm_kernels.attention / attention_jvp (A24-A27).

Every backend against the float64 plain-PyTorch reference with the 2x-PyTorch rule of
tests/conftest.py: the forward, the tangent (torch.func.jvp, forward_ad dual tensors, the explicit
attention_jvp with any tangent missing), the backward (autograd of the reference; gradcheck in
float64) and the backward through the tangent output (A27, autograd through torch.func.jvp of the
reference). Float64 central differences for the tangent. Hypothesis over shapes that are not block
multiples, GQA, masks, causal, strided layouts; the awkward cases of the issue; fully masked rows;
fp16 logits of 1e4; determinism; the raw ops' lse and mu; argument errors; opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scm_kernels
from scm_kernels import backend as _backend
from scm_kernels.attention import reference
from tests.conftest import DTYPES, FD_TOL, assert_rule, backend_param, examples, max_err

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _rand(shape, gen, layout, dtype, scale=1.0):
    """A (B, H, N, D) tensor; layout "bnhd": stored as (B, N, H, D) and viewed by transpose(1, 2);
    "slice": every other head of a bigger tensor; "contig": contiguous."""
    B, H, N, D = shape
    if layout == "bnhd":
        x = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    elif layout == "slice":
        x = torch.randn(B, 2 * H, N, D, generator=gen, dtype=torch.float64)[:, ::2]
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x * scale).to(dtype)


def make_mask(kind, B, H, Nq, Nk, gen, broadcast="full"):
    """None, a bool mask (some rows fully masked) or an additive float32 mask (some -inf, some
    rows fully -inf), in a broadcast shape."""
    if kind is None:
        return None
    shape = {"full": (B, H, Nq, Nk), "keys": (B, 1, 1, Nk), "2d": (Nq, Nk), "heads": (1, H, Nq, 1)}[broadcast]
    if kind == "bool":
        m = torch.rand(shape, generator=gen) > 0.3
        if broadcast in ("full", "2d"):
            m[..., min(1, shape[-2] - 1), :] = False  # a fully masked row
        return m
    m = torch.randn(shape, generator=gen, dtype=torch.float32)
    m = m.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
    if broadcast in ("full", "2d"):
        m[..., min(1, shape[-2] - 1), :] = float("-inf")
    return m


def make_case(B=2, Hq=2, Hkv=None, Nq=5, Nk=7, D=8, Dv=None, dtype=torch.float32, layout="contig", mask=None,
              broadcast="full", is_causal=False, scale=None, seed=0, tangents=(True, True, True)):
    """(args, kwargs, tangents) of one call; tangents: None where not given."""
    gen = torch.Generator().manual_seed(seed)
    Hkv = Hkv or Hq
    Dv = Dv or D
    q = _rand((B, Hq, Nq, D), gen, layout, dtype)
    k = _rand((B, Hkv, Nk, D), gen, layout, dtype)
    v = _rand((B, Hkv, Nk, Dv), gen, layout, dtype)
    tq, tk, tv = (_rand(x.shape, gen, layout, dtype) if want else None for x, want in zip((q, k, v), tangents))
    kw = dict(attn_mask=make_mask(mask, B, Hq, Nq, Nk, gen, broadcast), is_causal=is_causal, scale=scale,
              enable_gqa=Hkv != Hq)
    return (q, k, v), kw, (tq, tk, tv)


def _cast(x, dtype):
    return None if x is None else x.detach().to(dtype)


def _cast_kw(kw, dtype):
    m = kw["attn_mask"]
    if m is not None and m.dtype != torch.bool:
        m = m.to(dtype)
    return {**kw, "attn_mask": m}


def _ref(fn, xs, kw, dtype):
    """fn of the reference on xs cast to dtype (float64: the oracle; the input dtype: PyTorch's own)."""
    return fn(*(_cast(x, dtype) for x in xs), **_cast_kw(kw, dtype))


def _run(name, device, xs):
    return tuple(None if x is None else x.to(device) for x in xs)


def _kw_on(kw, device):
    """kw with its attn_mask on `device` (the cases are drawn on the CPU, where the oracle runs)."""
    m = kw["attn_mask"]
    return kw if m is None else {**kw, "attn_mask": m.to(device)}


@pytest.fixture(autouse=True)
def _no_cuda_cpp_kernel(request):
    """Attention has no CUDA C++ kernel (CUDA tensors run on the triton backend): the 'cuda' backend
    params skip; test_errors checks that backend='cuda' says so."""
    param = backend_param(request)
    if param is not None and param[0] == "cuda":
        pytest.skip("attention has no CUDA C++ kernel: CUDA tensors run on the triton backend")


def _skip_unsupported(name, dtype):
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16")


# ---------------------------------------------------------------------------------------------
# Reference self-checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.reference
def test_reference_matches_torch_sdpa():
    """Without fully masked rows the reference equals torch's math SDPA (float64)."""
    (q, k, v), kw, _ = make_case(B=2, Hq=4, Hkv=2, Nq=6, Nk=9, D=5, Dv=3, dtype=torch.float64)
    for extra in (dict(), dict(is_causal=True), dict(attn_mask=torch.randn(6, 9, dtype=torch.float64)),
                  dict(attn_mask=torch.rand(2, 1, 6, 9) > 0.0), dict(scale=0.3)):
        args = {**kw, **extra}
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **args)
        got = reference.attention(q, k, v, args.get("attn_mask"), args.get("is_causal", False), args.get("scale"),
                                  True)
        assert max_err(got, want) < 1e-13


@pytest.mark.reference
def test_reference_jvp_and_a27_formulas():
    """(A24) and the A27 gradient formulas of the kernels' contract, in float64, against autograd."""
    (q, k, v), kw, (tq, tk, tv) = make_case(B=1, Hq=2, Nq=5, Nk=6, D=4, Dv=3, dtype=torch.float64, seed=3)
    lam = 1 / math.sqrt(4)
    S = lam * q @ k.transpose(-1, -2)
    P = torch.softmax(S, -1)
    Sd = lam * (tq @ k.transpose(-1, -2) + q @ tk.transpose(-1, -2))
    mu = (P * Sd).sum(-1, keepdim=True)
    O = P @ v
    Od = (P * (Sd - mu)) @ v + P @ tv
    o, od = reference.attention_jvp(q, k, v, tq, tk, tv)
    assert max_err(o, O) < 1e-14 and max_err(od, Od) < 1e-14


# ---------------------------------------------------------------------------------------------
# Forward, tangent, backward against the reference
# ---------------------------------------------------------------------------------------------
def check_forward(name, device, xs, kw, dtype):
    out = scm_kernels.attention(*_run(name, device, xs), **_kw_on(kw, device), backend=name)
    assert out.dtype == dtype and out.shape == xs[0].shape[:3] + (xs[2].shape[-1],)
    assert not torch.isnan(out).any()
    assert_rule(out.cpu(), _ref(reference.attention, xs, kw, torch.float64),
                _ref(reference.attention, xs, kw, dtype), dtype, "out")


def check_jvp(name, device, xs, kw, ts, dtype):
    xs_d, ts_d = _run(name, device, xs), _run(name, device, ts)
    ref64 = _ref(lambda *a, **k: reference.attention_jvp(*a[:3], *a[3:], **k), xs + ts, kw, torch.float64)
    low = _ref(lambda *a, **k: reference.attention_jvp(*a[:3], *a[3:], **k), xs + ts, kw, dtype)
    out, tan = scm_kernels.attention_jvp(*xs_d, *ts_d, **_kw_on(kw, device), backend=name)
    assert not torch.isnan(tan).any()
    assert_rule(out.cpu(), ref64[0], low[0], dtype, "attention_jvp out")
    assert_rule(tan.cpu(), ref64[1], low[1], dtype, "attention_jvp tangent")
    if all(t is not None for t in ts):  # torch.func.jvp over the public function
        f = lambda q, k, v: scm_kernels.attention(q, k, v, **_kw_on(kw, device), backend=name)  # noqa: E731
        _, tan2 = torch.func.jvp(f, xs_d, ts_d)  # grad mode on: the differentiable (A27) route
        assert_rule(tan2.cpu(), ref64[1], low[1], dtype, "torch.func.jvp tangent")
        with torch.no_grad():  # as in sCM training: the tangent-only kernels from the saved lse
            _, tan3 = torch.func.jvp(f, xs_d, ts_d)
        assert_rule(tan3.cpu(), ref64[1], low[1], dtype, "torch.func.jvp tangent (no_grad)")


def _grads(fn, xs, gout):
    xs = [x.detach().requires_grad_() if x is not None else None for x in xs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * g).sum() for o, g in zip(outs, gout) if g is not None)
    want = [x for x in xs if x is not None]
    return torch.autograd.grad(loss, want, allow_unused=True, materialize_grads=True)


def check_backward(name, device, xs, kw, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    gout = torch.randn(xs[0].shape[:3] + (xs[2].shape[-1],), generator=gen, dtype=torch.float64).to(dtype)
    got = _grads(lambda *a: scm_kernels.attention(*a, **_kw_on(kw, device), backend=name), _run(name, device, xs),
                 (gout.to(device),))
    ref64 = _grads(lambda *a: reference.attention(*a, **_cast_kw(kw, torch.float64)),
                   [x.double() for x in xs], (gout.double(),))
    low = _grads(lambda *a: reference.attention(*a, **_cast_kw(kw, dtype)), list(xs), (gout,))
    for what, g, r, lo, x in zip(("dq", "dk", "dv"), got, ref64, low, xs):
        assert g.shape == x.shape and g.dtype == dtype
        assert_rule(g.cpu(), r, lo, dtype, what)


def check_jvp_backward(name, device, xs, kw, ts, dtype, gouts, seed=0):
    """Backward through (out, out_tangent) of attention_jvp (A27)."""
    def fn(backend_kw, kwx):
        def f(*a):
            return scm_kernels.attention_jvp(*a[:3], *a[3:], **kwx, **backend_kw)
        return f

    gen = torch.Generator().manual_seed(seed + 200)
    oshape = xs[0].shape[:3] + (xs[2].shape[-1],)
    g = [torch.randn(oshape, generator=gen, dtype=torch.float64).to(dtype) if want else None for want in gouts]
    got = _grads(fn(dict(backend=name), _kw_on(kw, device)), list(_run(name, device, xs + ts)),
                 [x if x is None else x.to(device) for x in g])
    ref64 = _grads(fn(dict(backend="reference"), _cast_kw(kw, torch.float64)), [_cast(x, torch.float64) for x in xs + ts],
                   [_cast(x, torch.float64) for x in g])
    low = _grads(fn(dict(backend="reference"), _cast_kw(kw, dtype)), list(xs + ts), g)
    names = [n for n, x in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), xs + ts) if x is not None]
    for what, a, r, lo in zip(names, got, ref64, low):
        assert a.dtype == dtype
        assert_rule(a.cpu(), r, lo, dtype, what)


@st.composite
def cases(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 1, 2, 3]))
    D = draw(st.sampled_from([1, 7, 16, 33, 40, 64, 72]))
    return dict(
        B=draw(st.integers(1, 2)), Hq=Hkv * G, Hkv=Hkv, Nq=draw(st.integers(1, 70)), Nk=draw(st.integers(1, 80)),
        D=D, Dv=draw(st.sampled_from([D, D, 5, 24])), layout=draw(st.sampled_from(["contig", "bnhd", "slice"])),
        mask=draw(st.sampled_from([None, None, "bool", "additive"])),
        broadcast=draw(st.sampled_from(["full", "keys", "2d", "heads"])), is_causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, None, 0.3, -0.4])), dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=cases())
def test_forward_matches_reference(backend, case):
    name, device = backend
    _skip_unsupported(name, case["dtype"])
    xs, kw, _ = make_case(**case)
    check_forward(name, device, xs, kw, case["dtype"])


@given(case=cases(), which=st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 0, 0)]))
def test_jvp_matches_reference(backend, case, which):
    name, device = backend
    _skip_unsupported(name, case["dtype"])
    xs, kw, ts = make_case(**case, tangents=tuple(map(bool, which)))
    check_jvp(name, device, xs, kw, ts, case["dtype"])


@given(case=cases())
def test_backward_matches_reference(backend, case):
    name, device = backend
    _skip_unsupported(name, case["dtype"])
    xs, kw, _ = make_case(**case)
    check_backward(name, device, xs, kw, case["dtype"], case["seed"])


@settings(max_examples=examples(10))
@given(case=cases(), which=st.sampled_from([(1, 1, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1)]),
       gouts=st.sampled_from([(1, 1), (0, 1), (1, 0)]))
def test_jvp_backward_matches_reference(backend, case, which, gouts):
    name, device = backend
    _skip_unsupported(name, case["dtype"])
    xs, kw, ts = make_case(**case, tangents=tuple(map(bool, which)))
    check_jvp_backward(name, device, xs, kw, ts, case["dtype"], gouts, case["seed"])


@pytest.mark.parametrize("is_causal", [False, True])
def test_single_key_gradients_are_exact_zeros(kernel_backend, is_causal):
    """Nk = 1: every softmax row is constant (P = 1), so the gradients w.r.t. q and k are exactly
    zero, in (A26) and in (A27) (with those of q' and k'), and dv = sum_i dO_i, dv' = sum_i g_i.
    The kernels' ds = P (dO.v - Delta) alone leaves the rounding difference of two dot products
    (a case the thorough hypothesis profile found over the 2x rule's floor)."""
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    gen = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen).to(device).requires_grad_()

    q, k, v, tq, tk, tv = r(2, 1, 3, 33), r(2, 1, 1, 33), r(2, 1, 1, 33), r(2, 1, 3, 33), r(2, 1, 1, 33), r(2, 1, 1, 33)
    do, g = torch.randn(2, 1, 3, 33, generator=gen).to(device), torch.randn(2, 1, 3, 33, generator=gen).to(device)
    out = scm_kernels.attention(q, k, v, scale=-0.4, is_causal=is_causal, backend=name)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert not dq.any() and not dk.any()
    torch.testing.assert_close(dv, do.sum(2, keepdim=True))  # causal (top-left): every query sees key 0
    o, ot = scm_kernels.attention_jvp(q, k, v, tq, tk, tv, scale=-0.4, backend=name)
    grads = torch.autograd.grad((o * do).sum() + (ot * g).sum(), (q, k, v, tq, tk, tv))
    for i in (0, 1, 3, 4):
        assert not grads[i].any()
    torch.testing.assert_close(grads[2], do.sum(2, keepdim=True))
    torch.testing.assert_close(grads[5], g.sum(2, keepdim=True))


# ---------------------------------------------------------------------------------------------
# The awkward cases of the issue (every kernel backend, every dtype)
# ---------------------------------------------------------------------------------------------
AWKWARD = {
    "Nq=1": dict(B=2, Hq=2, Nq=1, Nk=33, D=64),
    "Nq=97,Nk=1025": dict(B=1, Hq=1, Nq=97, Nk=1025, D=32),
    "d=72": dict(B=1, Hq=2, Nq=40, Nk=50, D=72),
    "d=111": dict(B=1, Hq=1, Nq=20, Nk=33, D=111),
    "d=256": dict(B=1, Hq=1, Nq=17, Nk=19, D=256),
    "dv!=dqk": dict(B=1, Hq=2, Nq=21, Nk=30, D=40, Dv=96),
    "gqa8:2": dict(B=1, Hq=8, Hkv=2, Nq=18, Nk=23, D=16),
    "mqa8:1": dict(B=1, Hq=8, Hkv=1, Nq=18, Nk=23, D=16),
    "bool mask, masked rows": dict(B=2, Hq=2, Nq=20, Nk=30, D=16, mask="bool"),
    "additive mask (B,1,1,Nk)": dict(B=2, Hq=2, Nq=20, Nk=30, D=16, mask="additive", broadcast="keys"),
    "causal Nq<Nk": dict(B=1, Hq=2, Nq=13, Nk=70, D=16, is_causal=True),
    "causal Nq>Nk": dict(B=1, Hq=2, Nq=70, Nk=13, D=16, is_causal=True),
    "causal+mask": dict(B=1, Hq=2, Nq=30, Nk=30, D=16, is_causal=True, mask="bool"),
    "(B,N,H,D) views": dict(B=2, Hq=3, Nq=25, Nk=31, D=24, layout="bnhd"),
}


@pytest.mark.parametrize("case", list(AWKWARD), ids=list(AWKWARD))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_awkward_cases(kernel_backend, case, dtype):
    name, device = kernel_backend
    if _backend.triton_interpret() and name == "triton" and dtype != DTYPES[list(AWKWARD).index(case) % len(DTYPES)]:
        pytest.skip("the interpreter is slow: each case in one dtype there (cycled); every dtype on a GPU")
    xs, kw, ts = make_case(**AWKWARD[case], dtype=dtype, seed=len(case))
    check_forward(name, device, xs, kw, dtype)
    check_backward(name, device, xs, kw, dtype)
    check_jvp(name, device, xs, kw, ts, dtype)
    check_jvp_backward(name, device, xs, kw, ts, dtype, (1, 1))


@pytest.mark.parametrize("case", ["d=256", "gqa8:2", "bool mask, masked rows", "additive mask (B,1,1,Nk)",
                                  "causal Nq>Nk", "(B,N,H,D) views", "dv!=dqk"])
def test_jvp_blockwise_fallback(kernel_backend, monkeypatch, case):
    """The JVP families without a kernel tile (fp32 "ieee" at heads wider than 128, e.g. CIFAR-10
    DDPM++'s single 256-wide head) run _jvp_blockwise on a GPU; here forced for every head width
    under the interpreter: out, out_tangent, and the backward through both (it reads lse and mu),
    against the float64 reference, one tangent absent too."""
    name, device = kernel_backend
    if name != "triton":
        pytest.skip("the Triton launcher's fallback")
    from scm_kernels.attention import triton_fwd

    monkeypatch.setattr(triton_fwd, "INTERPRETER_JVP_BLOCKWISE", True)
    monkeypatch.setattr(triton_fwd, "_CFG", {**triton_fwd._CFG, ("jvp", "ieee"): {}})
    from scm_kernels.attention import blockwise

    monkeypatch.setattr(blockwise, "BLOCK_ELEMS", 64)  # several query blocks
    called = []
    real = triton_fwd._jvp_blockwise
    monkeypatch.setattr(triton_fwd, "_jvp_blockwise", lambda *a: called.append(1) or real(*a))
    dtype = torch.float32
    xs, kw, ts = make_case(**AWKWARD[case], dtype=dtype, seed=len(case))
    check_jvp(name, device, xs, kw, ts, dtype)
    check_jvp_backward(name, device, xs, kw, ts, dtype, (1, 1))
    xs, kw, ts = make_case(**AWKWARD[case], dtype=dtype, seed=len(case), tangents=(False, True, True))
    check_jvp(name, device, xs, kw, ts, dtype)
    assert called


@pytest.mark.parametrize("scale", [0.0, -0.4], ids=["zero", "negative"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_nonpositive_scale(kernel_backend, scale, is_causal):
    """The unmasked Triton kernels fold a positive scale into the exponent; a zero or negative one
    takes the masked kernels with a zero mask. Either way: the reference's numbers."""
    name, device = kernel_backend
    dtype = torch.float32
    xs, kw, ts = make_case(B=1, Hq=2, Nq=37, Nk=45, D=24, is_causal=is_causal, scale=scale, dtype=dtype, seed=5)
    check_forward(name, device, xs, kw, dtype)
    check_jvp(name, device, xs, kw, ts, dtype)
    check_backward(name, device, xs, kw, dtype)


@pytest.mark.parametrize("D", [1, 40, 80, 96, 160])
def test_head_dims(kernel_backend, D):
    name, device = kernel_backend
    xs, kw, ts = make_case(B=1, Hq=1, Nq=19, Nk=21, D=D, dtype=torch.float16, seed=D)
    check_forward(name, device, xs, kw, torch.float16)
    check_jvp(name, device, xs, kw, ts, torch.float16)
    check_backward(name, device, xs, kw, torch.float16)


@pytest.mark.parametrize("D", [200, 256])
@pytest.mark.parametrize("mask", [None, "bool"])
def test_fp32_wide_heads(kernel_backend, D, mask):
    """fp32 at 256-wide heads: the Triton forward and JVP kernels read q, q̇, k, k̇ in D_CHUNK-wide
    slices per key block there (_chunked_scores; the interpreter runs it with 16-wide slices), and
    D = 200 leaves part of the last slices past D. The awkward cases above run d=256 in fp16 only
    under the interpreter."""
    name, device = kernel_backend
    dtype = torch.float32
    xs, kw, ts = make_case(B=1, Hq=2, Nq=21, Nk=27, D=D, mask=mask, dtype=dtype, seed=D)
    check_forward(name, device, xs, kw, dtype)
    check_backward(name, device, xs, kw, dtype)
    check_jvp(name, device, xs, kw, ts, dtype)  # on a GPU: _jvp_blockwise (no 3xTF32 JVP tile at d > 128)
    xs, kw, ts = make_case(B=1, Hq=2, Nq=21, Nk=27, D=D, mask=mask, dtype=dtype, seed=D, tangents=(True, False, True))
    check_jvp(name, device, xs, kw, ts, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_huge_logits(kernel_backend, dtype):
    """Logits up to ~1e4 in fp16/bf16 inputs: no overflow, no NaN (the logits live in fp32)."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 2, 24, 16, generator=gen) * 25).to(dtype)
    k = (torch.randn(1, 2, 30, 16, generator=gen) * 25).to(dtype)
    v = torch.randn(1, 2, 30, 16, generator=gen).to(dtype)
    s = reference.logits(q.double(), k.double(), scale=1.0)
    assert float(s.abs().max()) > 5e3
    xs = (q, k, v)
    out = scm_kernels.attention(*_run(name, device, xs), scale=1.0, backend=name).cpu()
    ref = reference.attention(*(x.double() for x in xs), scale=1.0)
    assert torch.isfinite(out).all()
    # PyTorch's own fp16 math overflows here; the yardstick is the dtype's rounding of the output
    assert max_err(out, ref) <= 2 * torch.finfo(dtype).eps * max(1.0, float(ref.abs().max())) + 1e-6
    ts = tuple(torch.randn(x.shape, generator=gen).to(dtype) for x in xs)
    o2, t2 = scm_kernels.attention_jvp(*_run(name, device, xs), *_run(name, device, ts), scale=1.0, backend=name)
    assert torch.isfinite(t2).all() and torch.isfinite(o2).all()
    g = _grads(lambda *a: scm_kernels.attention(*a, scale=1.0, backend=name), _run(name, device, xs),
               (torch.ones(out.shape, dtype=dtype, device=device),))
    assert all(torch.isfinite(x).all() for x in g)


def test_fully_masked_rows_are_zero(kernel_backend):
    """Every key hidden (bool mask, additive -inf): out and tangent rows are 0, gradients finite."""
    name, device = kernel_backend
    for kind in ("bool", "additive"):
        xs, kw, ts = make_case(B=1, Hq=2, Nq=6, Nk=9, D=8, mask=kind, seed=11)
        m = kw["attn_mask"]
        m[..., 2, :] = False if kind == "bool" else float("-inf")
        xs_d = _run(name, device, xs)
        kwd = _kw_on(kw, device)
        out, tan = scm_kernels.attention_jvp(*xs_d, *_run(name, device, ts), **kwd, backend=name)
        assert (out[:, :, 2] == 0).all() and (tan[:, :, 2] == 0).all()
        assert torch.isfinite(out).all() and torch.isfinite(tan).all()
        g = _grads(lambda *a: scm_kernels.attention(*a, **kwd, backend=name), xs_d, (torch.ones_like(out),))
        assert all(torch.isfinite(x).all() for x in g)
        assert (g[0][:, :, 2] == 0).all()


# ---------------------------------------------------------------------------------------------
# float64: gradcheck and finite differences (the backends that take float64)
# ---------------------------------------------------------------------------------------------
def _f64_backends(backend):
    name, device = backend
    if name == "triton":
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    return name, device


@pytest.mark.parametrize("opts", [dict(), dict(is_causal=True, Hq=4, Hkv=2), dict(mask="additive", Dv=3)],
                         ids=["plain", "causal-gqa", "mask-dv"])
def test_gradcheck(backend, opts):
    name, device = _f64_backends(backend)
    xs, kw, ts = make_case(B=1, Nq=4, Nk=5, D=3, dtype=torch.float64, seed=7, **{"Hq": 2, **opts})
    xs = [x.requires_grad_() for x in xs]
    torch.autograd.gradcheck(lambda *a: scm_kernels.attention(*a, **kw, backend=name), xs, **FD_TOL)
    ts = [t.requires_grad_() for t in ts]
    torch.autograd.gradcheck(lambda *a: scm_kernels.attention_jvp(*a[:3], *a[3:], **kw, backend=name),
                             xs + ts, **FD_TOL)


def test_jvp_finite_differences(backend):
    """The tangent equals a float64 central difference of the op itself."""
    name, device = _f64_backends(backend)
    xs, kw, ts = make_case(B=1, Hq=4, Hkv=2, Nq=6, Nk=7, D=5, Dv=3, mask="bool", is_causal=True,
                           dtype=torch.float64, seed=9)
    f = lambda *a: scm_kernels.attention(*a, **_kw_on(kw, device), backend=name)  # noqa: E731
    _, tan = torch.func.jvp(f, xs, ts)
    h = 1e-6
    fd = (f(*(x + h * t for x, t in zip(xs, ts))) - f(*(x - h * t for x, t in zip(xs, ts)))) / (2 * h)
    torch.testing.assert_close(tan, fd, **FD_TOL)
    # forward_ad dual tensors give the same tangent
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(xs, ts)]
        tan2 = fwAD.unpack_dual(f(*duals)).tangent
    torch.testing.assert_close(tan2, tan, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Raw ops: lse and mu, output layout, determinism
# ---------------------------------------------------------------------------------------------
def _raw(name):
    if name == "triton":
        from scm_kernels.attention import triton_kernels  # noqa: F401

        return torch.ops.scm_triton, ("ieee",)
    return torch.ops.scm, ()


# The Triton backward's launch variants that the GPU configurations select but the interpreter's
# defaults do not: the blockwise PyTorch fallback (families without a spill-free tile), dk and dv
# in two programs (split), and a compiled presence pattern that covers absent tangents (read as
# zeros). Each must give the same gradients, including the row statistics Δ and ν that the dq
# kernel writes (or PyTorch, without a dq kernel) for the dk/dv kernel.
BWD_VARIANTS = {
    "blockwise": dict(FORCE_BLOCKWISE=True),
    "split dk/dv": dict(INTERPRETER_CONFIG=[(16, 32, 1, 1), (32, 16, 1, 1), True]),
    "covering presence": dict(INTERPRETER_EXACT_PRESENCE=False),
}


@pytest.mark.parametrize("variant", list(BWD_VARIANTS))
@pytest.mark.parametrize("which", [(1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 1)], ids=str)
@pytest.mark.parametrize("gouts", [(1, 1), (0, 1), (1, 0)], ids=str)
def test_triton_backward_launch_variants(kernel_backend, variant, which, gouts, monkeypatch):
    name, device = kernel_backend
    if name != "triton":
        pytest.skip("launch variants of the Triton backward")
    from scm_kernels.attention import triton_bwd

    for attr, value in BWD_VARIANTS[variant].items():
        monkeypatch.setattr(triton_bwd, attr, value)
    case = dict(B=1, Hq=4, Hkv=2, Nq=37, Nk=45, D=24, Dv=40, mask="bool", is_causal=True, seed=sum(which))
    xs, kw, ts = make_case(**case, tangents=tuple(map(bool, which)))
    check_jvp_backward(name, device, xs, kw, ts, torch.float32, gouts, case["seed"])
    check_backward(name, device, xs, kw, torch.float32, case["seed"])


@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_raw_ops_statistics(kernel_backend, mask):
    """lse (+inf on fully masked rows) and mu = rowsum(P * S_dot) of the schema ops; the output is
    (B, Nq, Hq, Dv) memory."""
    name, device = kernel_backend
    xs, kw, ts = make_case(B=2, Hq=4, Hkv=2, Nq=11, Nk=13, D=6, Dv=5, mask=mask, is_causal=True, seed=21)
    ops, extra = _raw(name)
    B, H, Nq, _ = xs[0].shape
    m = kw["attn_mask"]
    mk = None if m is None else m.to(device).expand(B, H, Nq, 13)
    scale = 1 / math.sqrt(6)
    out, lse = ops.attention_fwd(*_run(name, device, xs), mk, True, scale, *extra)
    assert out.transpose(1, 2).is_contiguous()
    x64 = [x.double() for x in xs]
    m64 = None if m is None else (m if m.dtype == torch.bool else m.double())
    want = reference.lse(*x64[:2], m64, True, scale, True)
    assert_rule(lse.cpu(), want, want.float(), torch.float32, "lse")
    out2, tan, lse2, mu = ops.attention_jvp(*_run(name, device, xs + ts), mk, True, scale, *extra)
    assert torch.equal(lse2, lse) or max_err(lse2, lse) < 1e-5
    s = reference.logits(*x64[:2], m64, True, scale, True)
    p = reference.softmax(s)
    kd = reference.expand_kv(ts[1].double(), H)
    sd = scale * (ts[0].double() @ reference.expand_kv(x64[1], H).transpose(-1, -2) + x64[0] @ kd.transpose(-1, -2))
    want_mu = (p * torch.where(torch.isfinite(s), sd, torch.zeros_like(sd))).sum(-1)
    assert max_err(mu.cpu(), want_mu) < 1e-5 * max(1.0, float(want_mu.abs().max()))


def test_deterministic(kernel_backend):
    """Repeated calls are bitwise equal: forward, tangent, backward and the A27 backward."""
    name, device = kernel_backend
    xs, kw, ts = make_case(B=1, Hq=4, Hkv=2, Nq=40, Nk=70, D=24, mask="additive", is_causal=True, seed=4)
    xs_d, ts_d = _run(name, device, xs), _run(name, device, ts)

    def once():
        a = [x.detach().requires_grad_() for x in xs_d + ts_d]
        o, t = scm_kernels.attention_jvp(*a[:3], *a[3:], **_kw_on(kw, device), backend=name)
        g = torch.autograd.grad((o * 0.3 + t * 0.7).sum(), a)
        o2 = scm_kernels.attention(*a[:3], **_kw_on(kw, device), backend=name)
        g2 = torch.autograd.grad(o2.sum(), a[:3])
        return (o, t, *g, o2, *g2)

    r1, r2 = once(), once()
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


@pytest.mark.cpu
@pytest.mark.skipif(not _backend.extension_available(), reason="scm_kernels._C not built")
def test_cpu_independent_of_thread_count():
    xs, kw, ts = make_case(B=2, Hq=4, Hkv=2, Nq=70, Nk=90, D=24, mask="bool", seed=8)
    n = torch.get_num_threads()
    res = []
    try:
        for threads in (1, max(2, n)):
            torch.set_num_threads(threads)
            a = [x.detach().requires_grad_() for x in xs + ts]
            o, t = scm_kernels.attention_jvp(*a[:3], *a[3:], **kw, backend="cpu")
            res.append((o, t, *torch.autograd.grad((o + t).sum(), a)))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*res):
        assert torch.equal(a, b)


_BLAS_PATH_CASES = (dict(B=1, Hq=2, Nq=97, Nk=1030, D=72, Dv=40),
                    dict(B=2, Hq=4, Hkv=2, Nq=33, Nk=45, D=111, Dv=160, is_causal=True, mask="float", seed=3),
                    dict(B=1, Hq=1, Nq=7, Nk=5, D=256, dtype=torch.bfloat16))
_BLAS_PATH_SCRIPT = """
import math, sys, torch, scm_kernels
from tests.kernels.test_attention import _BLAS_PATH_CASES, make_case
out = []
for case in _BLAS_PATH_CASES:
    xs, kw, ts = make_case(**case)
    a = [x.requires_grad_() for x in xs + ts]
    o, ot = scm_kernels.attention_jvp(*a[:3], *a[3:], **kw, backend="cpu")
    grads = torch.autograd.grad((o.float() * o.float().cos()).sum() + ot.float().square().sum(), a)  # (A27)
    scale = 1 / math.sqrt(xs[0].shape[-1])
    o2, lse = torch.ops.scm.attention_fwd(*xs, None, kw["is_causal"], scale)  # the tangent-only kernel
    ot2 = torch.ops.scm.attention_jvp_tangent(*xs, *ts, o2, lse, None, kw["is_causal"], scale)[0]
    out.append((o.detach(), ot.detach(), o2, ot2, grads))
torch.save(out, sys.argv[1])
"""


def test_cpu_blas_and_register_tiled_paths(tmp_path):
    """The CPU kernels run their block products on a register-tiled AVX-512 GEMM where the CPU has
    AVX-512, else on the BLAS (also with SCM_KERNELS_CPU_BLAS set, read once per process). Both paths,
    each in its own process, meet the tolerance rule on shapes with tails in every dimension (Nk not
    a multiple of the key blocks, odd head dims, Dv > 64): attention_jvp, the tangent-only kernel,
    and the backward through both outputs (A27)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for extra in ({}, {"SCM_KERNELS_CPU_BLAS": "1"}):
        env = {k: v for k, v in os.environ.items() if k != "SCM_KERNELS_CPU_BLAS"}
        env.update(extra, PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))
        f = tmp_path / "out.pt"
        subprocess.run([sys.executable, "-c", _BLAS_PATH_SCRIPT, str(f)], env=env, cwd=root, check=True)
        for case, (o, ot, o2, ot2, grads) in zip(_BLAS_PATH_CASES, torch.load(f)):
            xs, kw, ts = make_case(**case)
            dtype = xs[0].dtype
            nomask = {**kw, "attn_mask": None}
            for got, k_, i in ((o, kw, 0), (ot, kw, 1), (o2, nomask, 0), (ot2, nomask, 1)):
                want = _ref(reference.attention_jvp, xs + ts, k_, torch.float64)[i]
                lowp = _ref(reference.attention_jvp, xs + ts, k_, dtype)[i]
                assert_rule(got, want, lowp, dtype, what=f"{extra or 'default'} {case} output {i}")

            def ref_grads(dt):
                a = [x.detach().to(dt).requires_grad_() for x in xs + ts]
                ro, rot = (y.to(torch.promote_types(dt, torch.float32))
                           for y in reference.attention_jvp(*a, **_cast_kw(kw, dt)))
                return torch.autograd.grad((ro * ro.cos()).sum() + rot.square().sum(), a)

            for i, (got, want, lowp) in enumerate(zip(grads, ref_grads(torch.float64), ref_grads(dtype))):
                assert_rule(got, want, lowp, dtype, what=f"{extra or 'default'} {case} gradient {i}")


def test_grad_after_jvp_pass_equals_plain_grad(kernel_backend):
    """A no-grad JVP pass (as in sCM training) leaves the following gradient pass unchanged."""
    name, device = kernel_backend
    xs, kw, ts = make_case(B=1, Hq=2, Nq=12, Nk=15, D=8, seed=13)
    xs_d, ts_d = _run(name, device, xs), _run(name, device, ts)
    f = lambda *a: scm_kernels.attention(*a, **_kw_on(kw, device), backend=name)  # noqa: E731
    a = [x.detach().requires_grad_() for x in xs_d]
    g0 = torch.autograd.grad(f(*a).square().sum(), a)
    with torch.no_grad():
        torch.func.jvp(f, tuple(xs_d), tuple(ts_d))
    g1 = torch.autograd.grad(f(*a).square().sum(), a)
    for x, y in zip(g0, g1):
        assert torch.equal(x, y)


def test_loss_on_jvp_tangent_differentiates(backend):
    """A loss on the tangent of torch.func.jvp taken with grad enabled has the reference's gradient
    (the jvp rule goes through the differentiable A27 Function there), for parameters upstream."""
    name, device = backend
    xs, kw, ts = make_case(B=1, Hq=2, Nq=9, Nk=11, D=8, mask="bool", is_causal=True, seed=17)
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(8, 8, generator=gen, dtype=torch.float64) / 3

    def grads(backend_name, dtype):
        W = W0.to(dtype).to(device).requires_grad_()
        q, k, v = (x.to(dtype).to(device) for x in xs)
        f = lambda q, k: scm_kernels.attention(q @ W, k, v, **_kw_on(kw, device), backend=backend_name)  # noqa: E731
        _, tan = torch.func.jvp(f, (q, k), (ts[0].to(dtype).to(device), ts[1].to(dtype).to(device)))
        return torch.autograd.grad(tan.square().sum(), W)[0].cpu()

    assert_rule(grads(name, torch.float32), grads("reference", torch.float64), grads("reference", torch.float32),
                torch.float32, "d loss(tangent) / dW")


def test_jvp_with_nondifferentiable_tangent(backend):
    """attention_jvp(differentiable_tangent=False) under grad: the same (out, out_tangent) as the
    differentiable call, out_tangent carries no gradient, out's gradient is attention's (the 2x rule
    against the float64 reference), and no tangent is saved for the backward (sCM's merged pass)."""
    name, device = backend
    xs, kw, ts = make_case(B=2, Hq=4, Hkv=2, Nq=11, Nk=13, D=8, mask="bool", seed=23)
    kw = {**_kw_on(kw, device), "enable_gqa": True}
    gen = torch.Generator().manual_seed(5)
    gout = torch.randn(2, 4, 11, 8, generator=gen, dtype=torch.float64)

    def run(backend_name, dtype, differentiable):
        a = [x.to(dtype).to(device).requires_grad_() for x in xs]
        t = [x.to(dtype).to(device) for x in ts]
        saved = []

        def pack(x):
            saved.append(x)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out, tan = scm_kernels.attention_jvp(*a, *t, **kw, backend=backend_name,
                                                 differentiable_tangent=differentiable)
        g = torch.autograd.grad((out * gout.to(dtype).to(device)).sum(), a)
        return out.detach(), tan, [x.cpu() for x in g], saved, t

    out, tan, g, saved, t = run(name, torch.float32, False)
    out1, tan1, _, _, _ = run(name, torch.float32, True)
    assert not tan.requires_grad and tan.grad_fn is None
    assert torch.equal(out, out1) and torch.equal(tan, tan1.detach())
    if name != "reference":
        tangent_ptrs = {x.untyped_storage().data_ptr() for x in t}
        saved_ptrs = {x.untyped_storage().data_ptr() for x in saved if isinstance(x, torch.Tensor)}
        assert saved and not saved_ptrs & tangent_ptrs
    _, _, g64, _, _ = run("reference", torch.float64, True)
    _, _, g32, _, _ = run("reference", torch.float32, True)
    for which, a, b, c in zip("qkv", g, g64, g32):
        assert_rule(a, b, c, torch.float32, f"d{which}")
    with pytest.raises(TypeError, match="differentiable_tangent must be a bool"):
        scm_kernels.attention_jvp(*(x.to(device) for x in (*xs, *ts)), **kw, differentiable_tangent=None)


@pytest.mark.cpu
@pytest.mark.skipif(not _backend.extension_available(), reason="scm_kernels._C not built")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_jvp_of_attention_is_one_fused_pass(grad, how):
    """torch.func.jvp / forward_ad over `attention` run the fused primal+tangent kernel once (A25),
    not the forward kernel followed by a tangent kernel, with or without grad enabled; the tangent is
    the explicit attention_jvp's, bit for bit."""
    xs, kw, ts = make_case(B=1, Hq=2, Nq=40, Nk=33, D=16, seed=21)
    xs, ts = [x.float() for x in xs], [t.float() for t in ts]
    f = lambda q, k, v: scm_kernels.attention(q, k, v, **kw, backend="cpu")  # noqa: E731
    with torch.set_grad_enabled(grad), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if how == "func":
            o, t = torch.func.jvp(f, tuple(xs), tuple(ts))
        else:
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                y = f(*(fwAD.make_dual(x, d) for x, d in zip(xs, ts)))
                o, t = fwAD.unpack_dual(y)
    calls = [e.name for e in prof.events() if e.name.startswith("scm::attention")]
    assert calls.count("scm::attention_jvp") == 1, calls
    assert "scm::attention_fwd" not in calls and "scm::attention_jvp_tangent" not in calls, calls
    o2, t2 = scm_kernels.attention_jvp(*xs, *ts, **kw, backend="cpu")
    assert torch.equal(o, o2) and torch.equal(t, t2)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors():
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 4, 6, 8)
    v = torch.randn(1, 4, 6, 8)
    A = scm_kernels.attention
    cases = [
        (lambda: A(q.numpy(), k, v), TypeError, "query must be a torch.Tensor"),
        (lambda: A(q.long(), k, v), TypeError, "query must have dtype"),
        (lambda: A(q, k.double(), v), TypeError, "key has dtype torch.float64 but query has torch.float32"),
        (lambda: A(q[0], k, v), ValueError, "query must be 4-D"),
        (lambda: A(q, k[..., :7], v), ValueError, "head dim of key (7) must equal head dim of query (8)"),
        (lambda: A(q, k, v[:, :, :5]), ValueError, "value (B, Hkv, Nk, Dv)"),
        (lambda: A(q, torch.randn(2, 4, 6, 8), v), ValueError, "batch sizes differ"),
        (lambda: A(torch.randn(1, 4, 5, 257), torch.randn(1, 4, 6, 257), v), ValueError, "must be <= 256, got 257"),
        (lambda: A(q, k[:, :2], v[:, :2]), ValueError, "pass enable_gqa=True"),
        (lambda: A(q, k[:, :3], v[:, :3], enable_gqa=True), ValueError, "multiple of the key/value heads (3)"),
        (lambda: A(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError, "does not broadcast"),
        (lambda: A(q, k, v, attn_mask=torch.ones(2, 1, 5, 6, dtype=torch.bool)), ValueError, "does not broadcast"),
        (lambda: A(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
        (lambda: A(q, k, v, attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
        (lambda: A(q, k, v, attn_mask=torch.zeros(5, 6, requires_grad=True)), ValueError, "attn_mask requires grad"),
        (lambda: A(q, k, v, is_causal=1), TypeError, "is_causal must be a bool"),
        (lambda: A(q, k, v, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: A(q, k, v, scale="x"), TypeError, "scale must be a real number"),
        (lambda: A(q, k, v, precision="tf64"), ValueError, "precision must be one of"),
        (lambda: A(q, k, v, backend="gpu"), ValueError, "backend"),
        (lambda: A(q[:, :, :0], k, v), ValueError, "query must not be empty"),
        (lambda: scm_kernels.attention_jvp(q, k, v, q[:, :, :4], None, None), ValueError,
         "query_tangent must have the shape of its primal"),
        (lambda: scm_kernels.attention_jvp(q, k, v, None, k.half(), None), TypeError,
         "key_tangent has dtype torch.float16 but its primal has torch.float32"),
        (lambda: scm_kernels.attention_jvp(q, k, v, None, None, "v"), TypeError, "value_tangent must be a torch.Tensor"),
    ]
    cases.append((lambda: A(q, k.to("meta"), v), ValueError, "key is on meta but query is on cpu"))
    if torch.cuda.is_available() and _backend.extension_has_cuda():
        qc = q.cuda()
        cases.append((lambda: A(qc, qc, qc, backend="cuda"), ValueError, "there is no CUDA C++ attention kernel"))
    for fn, exc, msg in cases:
        with pytest.raises(exc) as info:
            fn()
        assert msg in str(info.value), (msg, str(info.value))


@pytest.mark.skipif(not _backend.triton_available(), reason="needs triton")
def test_triton_refuses_float64():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    if not _backend.triton_interpret():
        pytest.skip("needs the interpreter for CPU tensors")
    with pytest.raises(TypeError, match="backend 'triton' takes float32"):
        scm_kernels.attention(q, q, q, backend="triton")


@pytest.mark.parametrize("ns", ["scm", "scm_triton"])
def test_opcheck(ns):
    """torch.library.opcheck (schema, fake tensors, AOT dispatch) of the four schema ops."""
    if ns == "scm" and not _backend.extension_available():
        pytest.skip("scm_kernels._C not built")
    if ns == "scm_triton" and not (_backend.triton_interpret() and _backend.triton_available()):
        pytest.skip("needs the Triton interpreter on CPU tensors")
    ops, extra = _raw("triton" if ns == "scm_triton" else "cpu")
    xs, kw, ts = make_case(B=1, Hq=2, Hkv=1, Nq=5, Nk=6, D=4, Dv=3, mask="bool", layout="bnhd", seed=2)
    m = kw["attn_mask"]
    q, k, v = xs
    out, lse = ops.attention_fwd(q, k, v, m, True, 0.5, *extra)
    o2, t2, lse2, mu = ops.attention_jvp(q, k, v, *ts, m, True, 0.5, *extra)
    g = torch.randn_like(out)
    for op, args in [
        (ops.attention_fwd.default, (q, k, v, m, True, 0.5, *extra)),
        (ops.attention_fwd.default, (q, k, v, None, False, 0.5, *extra)),
        (ops.attention_bwd.default, (g, q, k, v, out, lse, m, True, 0.5, *extra)),
        (ops.attention_jvp.default, (q, k, v, *ts, m, True, 0.5, *extra)),
        (ops.attention_jvp.default, (q, k, v, None, ts[1], None, None, False, 0.5, *extra)),
        (ops.attention_jvp_bwd.default, (g, g, q, k, v, *ts, o2, t2, lse2, mu, m, True, 0.5, *extra)),
        (ops.attention_jvp_bwd.default, (None, g, q, k, v, None, ts[1], None, o2, t2, lse2, mu, m, True, 0.5, *extra)),
    ]:
        torch.library.opcheck(op, args)


def test_every_gpu_kernel_expects_tensor_cores():
    """Every attention kernel the launchers can run on a GPU is compiled by the AOT report with
    expects_mma=True, so a build whose SASS has no HMMA/HGMMA fails there (fp32 "ieee" included:
    it runs 3xTF32 dots, DOT_PREC). No elementwise pre-pass: the dq kernel writes Δ."""
    pytest.importorskip("triton")
    from scm_kernels.attention import triton_bwd, triton_kernels

    specs = triton_kernels.AOT_SPECS
    assert specs and all(s.expects_mma for s in specs), [s.config for s in specs if not s.expects_mma]
    assert {s.kernel_name for s in triton_bwd.AOT_SPECS} == {"_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    assert triton_bwd.DOT_PREC == {"ieee": "tf32x3", "tf32": "tf32"}
