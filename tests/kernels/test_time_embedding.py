"""Tests of scm_kernels.time_embedding (A10) on every backend that runs here.

Oracle: scm_kernels.time_embedding.reference in float64 (ref64); PyTorch's own float32 result is the
same reference with compute_dtype=float32 (the embedding is float32 by contract, whatever t's dtype),
compared with the 2x-PyTorch rule of tests/conftest.py (assert_rule).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scm_kernels import backend as _backend
from scm_kernels.time_embedding import reference, time_embedding
from tests.conftest import FD_TOL, assert_rule, examples, max_err

T_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
F64 = torch.float64


def _rule_dtype(dtype):
    """The tolerance class of a gradient returned in `dtype`: the op computes in float32, so float64
    inputs get float32's floor; float16/bfloat16 gradients carry their own rounding."""
    return torch.float32 if dtype == F64 else dtype


def _emb(t, dim, name, **kw):
    return time_embedding(t, dim, backend=name, **kw)


def _ref(t, dim, dtype, **kw):
    return reference.time_embedding(t, dim, compute_dtype=dtype, **kw)


def _make_t(B, dtype, layout, device, gen, lo=-0.5, hi=2.0):
    """Times of B samples in `dtype` and the requested memory layout (B = 1 for 0-d and numbers)."""
    if layout == "number":
        return float(torch.empty(()).uniform_(lo, hi, generator=gen))
    if layout == "0d":
        return torch.empty((), dtype=F64).uniform_(lo, hi, generator=gen).to(dtype).to(device)
    if layout == "strided":  # a batch slice t[::2]
        return torch.empty(2 * B, dtype=F64).uniform_(lo, hi, generator=gen).to(dtype).to(device)[::2]
    if layout == "expanded":  # one time broadcast over the batch (stride 0)
        return torch.empty(1, dtype=F64).uniform_(lo, hi, generator=gen).to(dtype).to(device).expand(B)
    if layout == "column":  # a (1, 1) tensor: one element
        return torch.empty(1, 1, dtype=F64).uniform_(lo, hi, generator=gen).to(dtype).to(device)
    return torch.empty(B, dtype=F64).uniform_(lo, hi, generator=gen).to(dtype).to(device)


def _make_freqs(half, dtype, device, gen, strided=False, scale=4.0):
    n = 3 * half if strided else half
    f = (torch.randn(n, dtype=F64, generator=gen) * scale).to(dtype).to(device)
    return f[::3] if strided else f


def _check_forward(name, device, t, dim, kw):
    out = _emb(t, dim, name, **kw)
    B = t.numel() if isinstance(t, torch.Tensor) else 1
    assert out.shape == (B, dim) and out.dtype == torch.float32 and out.device.type == device
    assert out.is_contiguous()
    assert_rule(out, _ref(t, dim, F64, **kw), _ref(t, dim, torch.float32, **kw), torch.float32)
    if dim % 2:
        assert bool((out[:, -1] == 0).all())


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@settings(max_examples=examples(14))
@given(
    B=st.sampled_from([1, 2, 7, 97]),
    dim=st.sampled_from([2, 3, 8, 33, 64, 130]),
    kind=st.sampled_from(["positional", "fourier"]),
    dtype=st.sampled_from(T_DTYPES),
    layout=st.sampled_from(["contiguous", "strided", "expanded", "0d", "number", "column"]),
    time_scale=st.sampled_from([1.0, 0.02, 1000.0, -3.0]),
    max_period=st.sampled_from([10000.0, 1.0, 0.5]),
    fdtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    fstrided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_reference(backend, B, dim, kind, dtype, layout, time_scale, max_period, fdtype,
                                   fstrided, seed):
    name, device = backend
    gen = torch.Generator().manual_seed(seed)
    t = _make_t(B, dtype, layout, device, gen)
    kw = dict(kind=kind, time_scale=time_scale, max_period=max_period)
    if kind == "fourier":
        kw["freqs"] = _make_freqs(dim // 2, fdtype, device, gen, strided=fstrided)
    elif layout == "number" and device != "cpu":
        # a Python number without freqs has no device but the CPU, where the GPU backends refuse it
        with pytest.raises(ValueError, match=r"needs CUDA tensors"):
            _emb(t, dim, name, **kw)
        return
    _check_forward(name, device, t, dim, kw)


@pytest.mark.parametrize("B,dim", [(1, 2), (1000, 7), (97, 1025), (3, 4097)])
@pytest.mark.parametrize("kind", ["positional", "fourier"])
def test_forward_awkward_shapes(backend, B, dim, kind):
    name, device = backend
    gen = torch.Generator().manual_seed(B * 7919 + dim)
    t = _make_t(B, torch.float32, "contiguous", device, gen, lo=0.0, hi=math.pi / 2)
    kw = dict(kind=kind)
    if kind == "fourier":
        kw["freqs"] = _make_freqs(dim // 2, torch.float32, device, gen, scale=16.0)
    _check_forward(name, device, t, dim, kw)


@pytest.mark.parametrize("time_scale", [1e4, 3e5])
def test_forward_large_arguments(backend, time_scale):
    """|s c omega| beyond the range of the CPU kernel's fast reduction: still accurate."""
    name, device = backend
    t = torch.tensor([0.0, 1e-3, 0.7, -1.3, math.pi / 2], device=device)
    _check_forward(name, device, t, 66, dict(time_scale=time_scale))


def test_paper_constants(backend):
    """emb of t = 0 is [1 ... 1 | 0 ... 0]; omega_0 = 1 so column 0 is cos(s t) and column half is sin(s t)."""
    name, device = backend
    t = torch.tensor([0.0, 0.5, 1.25], device=device)
    out = _emb(t, 10, name, time_scale=2.0)
    assert bool((out[0, :5] == 1).all()) and bool((out[0, 5:] == 0).all())
    assert max_err(out[:, 0], torch.cos(2.0 * t)) < 1e-6
    assert max_err(out[:, 5], torch.sin(2.0 * t)) < 1e-6
    # the last positional frequency is max_period^(-(half-1)/half)
    w_last = 10000.0 ** (-4 / 5)
    assert max_err(out[:, 4], torch.cos(2.0 * t.double() * w_last)) < 1e-6


def test_autocast_keeps_float32(backend):
    name, device = backend
    t = torch.linspace(0, 1.5, 9, device=device, requires_grad=True)
    freqs = torch.randn(8, device=device)
    plain = _emb(t, 16, name, kind="fourier", freqs=freqs)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = _emb(t, 16, name, kind="fourier", freqs=freqs)
        out_pos = _emb(t.detach(), 33, name)
    assert out.dtype == torch.float32 and out_pos.dtype == torch.float32
    assert max_err(out, plain) == 0.0
    assert_rule(out_pos, _ref(t.detach(), 33, F64), _ref(t.detach(), 33, torch.float32), torch.float32)
    out.sum().backward()
    assert t.grad is not None and t.grad.dtype == torch.float32


def test_no_autograd_graph_when_not_needed(kernel_backend):
    name, device = kernel_backend
    t = torch.rand(5, device=device)
    assert _emb(t, 8, name).grad_fn is None
    assert _emb(t.requires_grad_(), 8, name).grad_fn is not None
    with torch.no_grad():
        assert _emb(t, 8, name).grad_fn is None


def test_deterministic(kernel_backend):
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(3)
    t = _make_t(97, torch.float32, "contiguous", device, gen)
    freqs = _make_freqs(50, torch.float32, device, gen)
    outs, grads = [], []
    for _ in range(3):
        f = freqs.clone().requires_grad_()
        tt = t.clone().requires_grad_()
        out = _emb(tt, 101, name, kind="fourier", freqs=f)
        out.backward(torch.cos(torch.arange(out.numel(), device=device, dtype=torch.float32)).view_as(out))
        outs.append(out.detach())
        grads.append((tt.grad, f.grad))
    for o, (gt, gf) in zip(outs[1:], grads[1:]):
        assert torch.equal(o, outs[0]) and torch.equal(gt, grads[0][0]) and torch.equal(gf, grads[0][1])


@pytest.mark.cpu
@pytest.mark.skipif(not _backend.extension_available(), reason="scm_kernels._C not built")
def test_cpu_backward_independent_of_threads():
    gen = torch.Generator().manual_seed(5)
    t = _make_t(300, torch.float32, "contiguous", "cpu", gen).requires_grad_()
    freqs = _make_freqs(64, torch.float32, "cpu", gen).requires_grad_()
    g = torch.randn(300, 128, generator=gen)
    res = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            dt, df = torch.autograd.grad(_emb(t, 128, "cpu", kind="fourier", freqs=freqs), (t, freqs), g)
            res.append((dt, df))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
def _grads(fn, t, freqs, g):
    """(dt, dfreqs) of sum(fn(t, freqs) * g) by autograd, on leaf copies of the inputs."""
    t = t.detach().clone().requires_grad_()
    inputs = [t]
    if freqs is not None:
        freqs = freqs.detach().clone().requires_grad_()
        inputs.append(freqs)
    out = fn(t, freqs)
    grads = torch.autograd.grad(out, inputs, g.to(out.dtype))
    return grads[0], (grads[1] if freqs is not None else None)


@settings(max_examples=examples(10))
@given(
    B=st.sampled_from([1, 7, 97]),
    dim=st.sampled_from([2, 5, 64, 97]),
    kind=st.sampled_from(["positional", "fourier"]),
    dtype=st.sampled_from(T_DTYPES),
    fdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    time_scale=st.sampled_from([1.0, 0.1, 50.0]),
    layout=st.sampled_from(["contiguous", "strided"]),
    grad_layout=st.sampled_from(["contiguous", "transposed", "expanded"]),
    seed=st.integers(0, 2**16),
)
def test_backward_matches_reference(backend, B, dim, kind, dtype, fdtype, time_scale, layout, grad_layout, seed):
    name, device = backend
    gen = torch.Generator().manual_seed(seed)
    t = _make_t(B, dtype, layout, device, gen)
    freqs = _make_freqs(dim // 2, fdtype, device, gen) if kind == "fourier" else None
    g = torch.randn(B, dim, generator=gen, dtype=F64).to(device)
    if grad_layout == "transposed":  # inner stride != 1
        g = g.t().contiguous().t()
    elif grad_layout == "expanded":  # stride 0, as from out.sum()
        g = g[:1].expand(B, dim)
    kw = dict(kind=kind, time_scale=time_scale)

    def ours(tt, ff):
        return _emb(tt, dim, name, freqs=ff, **kw)

    dt, df = _grads(ours, t, freqs, g)
    dt64, df64 = _grads(lambda tt, ff: _ref(tt.double(), dim, F64, freqs=None if ff is None else ff.double(), **kw),
                        t, freqs, g)
    dtl, dfl = _grads(lambda tt, ff: _ref(tt, dim, torch.float32, freqs=ff, **kw), t, freqs, g)
    assert dt.dtype == dtype and dt.shape == t.shape
    assert_rule(dt, dt64, dtl, _rule_dtype(dtype), "dt")
    if kind == "fourier":
        assert df.dtype == fdtype and df.shape == freqs.shape
        assert_rule(df, df64, dfl, _rule_dtype(fdtype), "dfreqs")


def test_backward_only_freqs(backend):
    """freqs requires grad, t does not (and the other way round)."""
    name, device = backend
    t = torch.linspace(0.1, 1.4, 6, device=device)
    freqs = torch.randn(4, device=device, requires_grad=True)
    out = _emb(t, 9, name, kind="fourier", freqs=freqs)
    (df,) = torch.autograd.grad(out.square().sum(), freqs)
    f64 = freqs.detach().double().requires_grad_()
    (df64,) = torch.autograd.grad(_ref(t, 9, F64, kind="fourier", freqs=f64).square().sum(), f64)
    f32 = freqs.detach().clone().requires_grad_()
    (dfl,) = torch.autograd.grad(_ref(t, 9, torch.float32, kind="fourier", freqs=f32).square().sum(), f32)
    assert_rule(df, df64, dfl, torch.float32, "dfreqs")
    t2 = t.clone().requires_grad_()
    (dt,) = torch.autograd.grad(_emb(t2, 9, name, kind="fourier", freqs=freqs.detach()).sum(), t2)
    assert dt.shape == t.shape


def test_gradcheck(backend):
    """gradcheck in float64 of the oracle (tight), and of the op itself: the op computes in float32 by
    contract, so its check uses a float32-sized step and tolerance."""
    name, device = backend
    t = torch.tensor([0.3, -0.7, 1.1], dtype=F64, device=device, requires_grad=True)
    freqs = torch.tensor([0.5, -1.25, 2.0], dtype=F64, device=device, requires_grad=True)
    for kw in (dict(), dict(kind="fourier")):
        def ref_fn(tt, ff, kw=kw):
            return _ref(tt, 7, F64, freqs=ff if kw else None, **kw)

        def op_fn(tt, ff, kw=kw):
            return _emb(tt, 7, name, freqs=ff if kw else None, **kw)

        assert torch.autograd.gradcheck(ref_fn, (t, freqs), **FD_TOL)
        assert torch.autograd.gradcheck(op_fn, (t, freqs), eps=1e-3, atol=2e-3, rtol=1e-2, nondet_tol=0.0,
                                        check_undefined_grad=False)


# ---------------------------------------------------------------------------------------------
# Forward-mode derivatives (JVP)
# ---------------------------------------------------------------------------------------------
def _jvp(fn, t, freqs, t_dot, f_dot):
    if freqs is None:
        return torch.func.jvp(lambda tt: fn(tt, None), (t,), (t_dot,))[1]
    return torch.func.jvp(fn, (t, freqs), (t_dot, f_dot))[1]


@settings(max_examples=examples(10))
@given(
    B=st.sampled_from([1, 7, 97]),
    dim=st.sampled_from([2, 5, 64, 97]),
    kind=st.sampled_from(["positional", "fourier"]),
    dtype=st.sampled_from(T_DTYPES),
    time_scale=st.sampled_from([1.0, 0.1, 50.0]),
    tangents=st.sampled_from(["t", "freqs", "both"]),
    seed=st.integers(0, 2**16),
)
def test_jvp_matches_reference(backend, B, dim, kind, dtype, time_scale, tangents, seed):
    name, device = backend
    gen = torch.Generator().manual_seed(seed)
    t = _make_t(B, dtype, "strided", device, gen)
    freqs = _make_freqs(dim // 2, torch.float32, device, gen) if kind == "fourier" else None
    t_dot = torch.randn(B, generator=gen, dtype=F64).to(dtype).to(device)
    if kind == "positional" or tangents == "t":
        f_dot = torch.zeros(dim // 2, device=device) if freqs is not None else None
    else:
        f_dot = torch.randn(dim // 2, generator=gen).to(device)
        if tangents == "freqs":
            t_dot = torch.zeros_like(t_dot)
    kw = dict(kind=kind, time_scale=time_scale)
    out = _jvp(lambda tt, ff: _emb(tt, dim, name, freqs=ff, **kw), t, freqs, t_dot, f_dot)
    tangent64 = _jvp(lambda tt, ff: _ref(tt, dim, F64, freqs=ff, **kw), t.double(),
                     None if freqs is None else freqs.double(), t_dot.double(),
                     None if f_dot is None else f_dot.double())
    tangent32 = _jvp(lambda tt, ff: _ref(tt, dim, torch.float32, freqs=ff, **kw), t, freqs, t_dot, f_dot)
    assert out.dtype == torch.float32 and out.shape == (B, dim)
    assert_rule(out, tangent64, tangent32, torch.float32, "jvp")


@pytest.mark.parametrize("kind", ["positional", "fourier"])
def test_jvp_finite_difference(backend, kind):
    """The op's JVP against a float64 central finite difference of the reference (and the reference's
    own JVP against the same finite difference, tightly)."""
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    t = torch.empty(9, dtype=F64).uniform_(0, 1.5, generator=gen).to(device)
    t_dot = torch.randn(9, dtype=F64, generator=gen).to(device)
    freqs = torch.randn(6, dtype=F64, generator=gen).to(device) if kind == "fourier" else None
    f_dot = torch.randn(6, dtype=F64, generator=gen).to(device) if kind == "fourier" else None
    kw = dict(kind=kind, time_scale=3.0)
    h = 1e-6

    def r64(tt, ff):
        return _ref(tt, 13, F64, freqs=ff, **kw)

    fd = (r64(t + h * t_dot, None if freqs is None else freqs + h * f_dot)
          - r64(t - h * t_dot, None if freqs is None else freqs - h * f_dot)) / (2 * h)
    tangent64 = _jvp(r64, t, freqs, t_dot, f_dot)
    torch.testing.assert_close(tangent64, fd, **FD_TOL)
    t32, td32 = t.float(), t_dot.float()
    f32 = None if freqs is None else freqs.float()
    fd32 = None if f_dot is None else f_dot.float()
    out = _jvp(lambda tt, ff: _emb(tt, 13, name, freqs=ff, **kw), t32, f32, td32, fd32)
    tangent32 = _jvp(lambda tt, ff: _ref(tt, 13, torch.float32, freqs=ff, **kw), t32, f32, td32, fd32)
    fd_same_inputs = _jvp(r64, t32.double(), None if f32 is None else f32.double(), td32.double(),
                          None if fd32 is None else fd32.double())
    assert_rule(out, fd_same_inputs, tangent32, torch.float32, "jvp vs reference")
    assert max_err(out, fd) < 1e-5 * max(1.0, float(fd.abs().max()))


def test_forward_ad_dual_tensors(backend):
    import torch.autograd.forward_ad as fwAD

    name, device = backend
    t = torch.linspace(0.0, 1.5, 7, device=device, dtype=torch.float16)
    t_dot = torch.linspace(-1, 1, 7, device=device, dtype=torch.float16)
    freqs = torch.randn(5, device=device)
    f_dot = torch.randn(5, device=device)
    with fwAD.dual_level():
        out = _emb(fwAD.make_dual(t, t_dot), 11, name, kind="fourier", freqs=fwAD.make_dual(freqs, f_dot))
        primal, tangent = fwAD.unpack_dual(out)
        out_t = _emb(fwAD.make_dual(t, t_dot), 11, name)  # positional, tangent of t only
        tangent_t = fwAD.unpack_dual(out_t).tangent
    kw = dict(kind="fourier")
    t64 = _jvp(lambda tt, ff: _ref(tt, 11, F64, freqs=ff, **kw), t.double(), freqs.double(), t_dot.double(),
               f_dot.double())
    t32 = _jvp(lambda tt, ff: _ref(tt, 11, torch.float32, freqs=ff, **kw), t.float(), freqs, t_dot.float(), f_dot)
    assert_rule(tangent, t64, t32, torch.float32, "forward_ad tangent")
    assert_rule(primal, _ref(t, 11, F64, freqs=freqs, **kw), _ref(t, 11, torch.float32, freqs=freqs, **kw),
                torch.float32)
    p64 = _jvp(lambda tt, ff: _ref(tt, 11, F64), t.double(), None, t_dot.double(), None)
    p32 = _jvp(lambda tt, ff: _ref(tt, 11, torch.float32), t.float(), None, t_dot.float(), None)
    assert_rule(tangent_t, p64, p32, torch.float32, "forward_ad tangent (positional)")


def test_jvp_inside_model(backend):
    """torch.func.jvp of a tiny MLP on the embedding (the sCM use, A13) equals the reference model's."""
    name, device = backend
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4)).to(device)
    mlp64 = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4)).to(device).double()
    mlp64.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    t = torch.linspace(0.05, 1.5, 10, device=device)
    t_dot = torch.cos(t) * torch.sin(t)  # the cos t sin t dc/dt tangent of A13
    f_ours, j_ours = torch.func.jvp(lambda tt: mlp(_emb(tt, 32, name, time_scale=0.5)), (t,), (t_dot,))
    f64, j64 = torch.func.jvp(lambda tt: mlp64(_ref(tt, 32, F64, time_scale=0.5)), (t.double(),), (t_dot.double(),))
    f32, j32 = torch.func.jvp(lambda tt: mlp(_ref(tt, 32, torch.float32, time_scale=0.5)), (t,), (t_dot,))
    assert_rule(f_ours, f64, f32, torch.float32, "model output")
    assert_rule(j_ours, j64, j32, torch.float32, "model jvp")
    # and the model's parameters still get gradients through the op (grad of the JVP, A17)
    loss = mlp(_emb(t.requires_grad_(), 32, name, time_scale=0.5)).square().sum()
    loss.backward()
    assert t.grad is not None and all(p.grad is not None for p in mlp.parameters())


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any kernel runs
# ---------------------------------------------------------------------------------------------
def test_errors(backend):
    name, device = backend
    t = torch.rand(4, device=device)
    freqs = torch.rand(3, device=device)
    cases = [
        (dict(t="0.5"), TypeError, r"t must be a torch.Tensor or a real number, got str"),
        (dict(t=torch.arange(4, device=device)), TypeError, r"t must have dtype in .*got torch.int64"),
        (dict(t=torch.rand(2, 3, device=device)), ValueError, r"t must have shape \(B,\).*got shape \(2, 3\)"),
        (dict(t=torch.rand(0, device=device)), ValueError, r"t must not be empty"),
        (dict(t=torch.tensor([0.1, float("nan")], device=device)), ValueError, r"t must be finite.*1 non-finite"),
        (dict(t=float("inf")), ValueError, r"t must be finite, got inf"),
        (dict(t=True), TypeError, r"t must be a torch.Tensor or a real number, got bool"),
        (dict(dim=1), ValueError, r"dim must be >= 2, got 1"),
        (dict(dim=8.0), TypeError, r"dim must be an int, got float"),
        (dict(kind="gaussian"), ValueError, r"kind must be one of \('positional', 'fourier'\), got 'gaussian'"),
        (dict(max_period=0.0), ValueError, r"max_period must be > 0, got 0.0"),
        (dict(max_period="big"), TypeError, r"max_period must be a real number, got str"),
        (dict(time_scale=float("nan")), ValueError, r"time_scale must be finite"),
        (dict(kind="fourier"), ValueError, r"kind='fourier' needs freqs, a \(3,\) tensor"),
        (dict(kind="fourier", freqs=torch.rand(4, device=device)), ValueError,
         r"freqs must have shape \(dim // 2,\) = \(3,\), got \(4,\)"),
        (dict(kind="fourier", freqs=torch.rand(3, 1, device=device)), ValueError, r"freqs must have shape"),
        (dict(kind="fourier", freqs=torch.arange(3, device=device)), TypeError, r"freqs must have dtype in"),
        (dict(kind="fourier", freqs=[1.0, 2.0, 3.0]), TypeError, r"freqs must be a torch.Tensor, got list"),
        (dict(kind="fourier", freqs=torch.rand(3, device="meta")), ValueError, r"freqs is on meta but t is on"),
        (dict(freqs=freqs), ValueError, r"freqs must be None when kind='positional'"),
        (dict(backend="tpu"), ValueError, r"backend: expected one of"),
    ]
    if str(device) == "cpu":
        cases.append((dict(backend="cuda"), ValueError, r"backend 'cuda' needs CUDA tensors"))
    elif not _backend.extension_has_cuda():
        cases.append((dict(backend="cuda"), ValueError, r"backend 'cuda' requested but scm_kernels._C was built "
                      "without CUDA kernels"))
    for over, exc, match in cases:
        kw = dict(t=t, dim=7, backend=name)
        kw.update(over)
        tt, dim = kw.pop("t"), kw.pop("dim")
        with pytest.raises(exc, match=match):
            time_embedding(tt, dim, **kw)


def test_finite_check_exact(backend):
    """Large finite times whose float16 sum overflows are accepted; one inf among them is not."""
    name, device = backend
    t = torch.full((4,), 60000.0, dtype=torch.float16, device=device)
    out = _emb(t, 6, name, time_scale=1e-4)
    assert_rule(out, _ref(t, 6, F64, time_scale=1e-4), _ref(t, 6, torch.float32, time_scale=1e-4), torch.float32)
    t[2] = float("inf")
    with pytest.raises(ValueError, match=r"t must be finite, got 1 non-finite value\(s\) \(e.g. inf\)"):
        _emb(t, 6, name)


# ---------------------------------------------------------------------------------------------
# torch.library: schemas, fake (meta) implementations, dispatch
# ---------------------------------------------------------------------------------------------
@pytest.mark.cpu
@pytest.mark.skipif(not _backend.extension_available(), reason="scm_kernels._C not built")
def test_opcheck_cpu():
    import scm_kernels.time_embedding.function  # noqa: F401  (registers the fake implementations)

    ops = torch.ops.scm
    t = torch.rand(5)
    freqs = torch.randn(4)
    t_dot, f_dot = torch.randn(5), torch.randn(4)
    grad = torch.randn(5, 9)
    cases = [
        (ops.time_embedding.default, (t, 9, 10000.0, 1.0, None)),
        (ops.time_embedding.default, (t[::2], 8, 100.0, 2.0, freqs)),
        (ops.time_embedding_jvp.default, (t, t_dot, 9, 10000.0, 1.0, None, None)),
        (ops.time_embedding_jvp.default, (t, None, 9, 10000.0, 1.0, freqs, f_dot)),
        (ops.time_embedding_backward.default, (grad, t, 9, 10000.0, 1.0, None, False)),
        (ops.time_embedding_backward.default, (grad, t, 9, 10000.0, 0.5, freqs, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Static tier: the Triton kernels compile for the GPUs (no GPU needed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.static
@pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")
def test_aot_specs_cover_launchers():
    """AOT_SPECS name every argument of its kernel and list every (tile, switch) combination the
    launchers can run; `python -m scm_kernels.aot --ops time_embedding` compiles them for sm_80/sm_90."""
    import itertools

    from scm_kernels.time_embedding import triton_kernels as tk

    specs = tk.AOT_SPECS
    for s in specs:
        assert list(s.signature) == list(s.fn.arg_names), s.kernel_name
        assert s.num_warps == tk.NUM_WARPS and s.constexprs["PRECISE_EXP"] is True
    have = {(s.kernel_name, tuple(sorted(s.constexprs.items()))) for s in specs}
    for half in (1, 7, 16, 33, 100, 128, 4000):
        bb, bk = tk._config(half)
        tiles = dict(BLOCK_B=bb, BLOCK_K=bk, PRECISE_EXP=True)
        for fourier, a, b in itertools.product((False, True), (False, True), (False, True)):
            want = [("_time_embedding_fwd", dict(tiles, FOURIER=fourier)),
                    ("_time_embedding_jvp", dict(tiles, FOURIER=fourier, HAS_TDOT=a, HAS_FDOT=b and fourier)),
                    ("_time_embedding_bwd", dict(tiles, FOURIER=fourier, NEED_DF=a and fourier))]
            for kernel, ce in want:
                assert (kernel, tuple(sorted(ce.items()))) in have, (kernel, ce)
