"""Tests of scm_kernels.trigflow_step (A23) on every backend that can run here.

Forward vs the float64 reference with the 2x-PyTorch rule; Philox noise vs the reference stream
(bit-identical uniforms) and its statistics; backward vs autograd of the reference and gradcheck;
JVP vs torch.func.jvp of the reference and float64 central differences; layouts; bad inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scm_kernels import backend as scm_backend
from scm_kernels.trigflow_step import reference as R
from scm_kernels.trigflow_step import trigflow_step
from scm_kernels.trigflow_step.function import philox_rows
from tests.conftest import DTYPES, FD_TOL, assert_rule, examples, max_err

# Inputs drawn without a device land on the backend's device (generators: torch.get_default_device()).
pytestmark = pytest.mark.usefixtures("on_backend_device")

SIG = 0.5
SHAPES = [(1,), (7,), (97,), (3, 5, 7), (1000,), (2, 3, 4, 5)]


def _times(B, gen, lo=0.05, hi=1.5):
    return (torch.rand(B, generator=gen) * (hi - lo) + lo).float()


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in a memory layout: contiguous, batch slice, channels_last, batch-broadcast."""
    if kind == "slice":
        big = torch.empty((2 * x.shape[0],) + x.shape[1:], dtype=x.dtype)
        big[::2] = x
        return big[::2]
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "expand":
        return x[:1].expand(x.shape)
    return x


def _inputs(B, shape, xd, fd, nd, gen, layout="contiguous"):
    x = _layout(torch.randn((B,) + shape, generator=gen).to(xd), layout)
    F = _layout(torch.randn((B,) + shape, generator=gen).to(fd), "slice" if layout == "expand" else layout)
    n = torch.randn((B,) + shape, generator=gen).to(nd)
    return x, F, n


def _pixel_check(out: torch.Tensor, x0_64: torch.Tensor) -> None:
    """uint8 pixels equal round-half-even of the float64 value, except within 1e-3 of a tie."""
    p = torch.clamp((x0_64 + 1) * 127.5, 0, 255)
    exact = torch.round(p).to(torch.uint8)
    near_tie = ((p - torch.floor(p)) - 0.5).abs() < 1e-3
    diff = (out.int() - exact.int()).abs()
    assert out.dtype == torch.uint8
    assert int(diff.max()) <= 1
    assert bool((diff[~near_tie] == 0).all()), "pixel differs from round(clamp((x0+1)*127.5)) away from a tie"


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@settings(max_examples=examples(12))
@given(B=st.sampled_from([1, 2, 3, 7]), shape=st.sampled_from(SHAPES), xd=st.sampled_from(DTYPES),
       fd=st.sampled_from(DTYPES), nd=st.sampled_from(DTYPES),
       mode=st.sampled_from(["denoise", "noise", "seed", "uint8"]),
       layout=st.sampled_from(["contiguous", "slice", "channels_last", "expand"]),
       per_sample=st.booleans(), seed=st.integers(0, 2**63 - 1))
def test_forward_matches_reference(backend, B, shape, xd, fd, nd, mode, layout, per_sample, seed):
    name, device = backend
    gen = torch.Generator(torch.get_default_device()).manual_seed(B * 1000 + len(shape))
    x, F, n = _inputs(B, shape, xd, fd, nd, gen, layout)
    t = _times(B, gen) if per_sample else 0.9
    s = _times(B, gen, 0.1, 1.2) if per_sample else 1.1
    kw = {}
    if mode == "noise":
        kw = dict(t_next=s, noise=n)
    elif mode == "seed":
        kw = dict(t_next=s, seed=seed)
    elif mode == "uint8":
        kw = dict(out_uint8=True)
    out = trigflow_step(x, F, t, SIG, backend=name, **kw)
    assert out.shape == x.shape
    assert out.dtype == (torch.uint8 if mode == "uint8" else xd)

    def d64(v):
        return v.double() if isinstance(v, torch.Tensor) else v

    kw64 = {k: d64(v) for k, v in kw.items()}
    if mode == "uint8":
        x0_64 = R.trigflow_step(x.double(), F.double(), d64(t), SIG)
        _pixel_check(out, x0_64)
        return
    ref64 = R.trigflow_step(x.double(), F.double(), d64(t), SIG, **kw64)
    lowp = R.trigflow_step(x, F, t, SIG, **kw)
    assert_rule(out, ref64, lowp, xd)


def test_reference_promotes_mixed_dtypes():
    """The reference backend computes in the promoted dtype: fp32 x_t with bf16 F (and bf16 noise)
    stays at fp32 accuracy (a number t makes cos/sin 0-d tensors, which type promotion ignores), and
    uint8 pixels of bf16 inputs come from an fp32 x0 (both found by the thorough hypothesis profile)."""
    gen = torch.Generator().manual_seed(1002)
    x, F, n = _inputs(2, (97,), torch.float32, torch.bfloat16, torch.bfloat16, gen)
    for kw in (dict(), dict(t_next=0.4, noise=n)):
        out = trigflow_step(x, F, 0.9, SIG, backend="reference", **kw)
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        ref = R.trigflow_step(x.double(), F.double(), 0.9, SIG, **kw64)
        assert out.dtype == torch.float32 and max_err(out, ref) < 1e-6
    xb = x.to(torch.bfloat16)
    _pixel_check(trigflow_step(xb, F, 0.9, SIG, backend="reference", out_uint8=True),
                 R.trigflow_step(xb.double(), F.double(), 0.9, SIG))


@pytest.mark.parametrize("layout", ["contiguous", "slice", "channels_last", "expand"])
def test_layout_kept_without_copies(kernel_backend, layout):
    """The output has x_t's inner layout (channels_last stays channels_last)."""
    name, _ = kernel_backend
    gen = torch.Generator(torch.get_default_device()).manual_seed(0)
    x, F, n = _inputs(3, (4, 5, 6), torch.float32, torch.float32, torch.float32, gen, layout)
    out = trigflow_step(x, F, 0.7, SIG, t_next=0.3, noise=n, backend=name)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    ref = R.trigflow_step(x.double(), F.double(), 0.7, SIG, t_next=0.3, noise=n.double())
    assert_rule(out, ref, R.trigflow_step(x, F, 0.7, SIG, t_next=0.3, noise=n), torch.float32)


def test_float64_inputs(backend):
    name, _ = backend
    if name == "triton":
        pytest.skip("triton takes float32/float16/bfloat16 (float64 raises, see test_bad_inputs)")
    gen = torch.Generator(torch.get_default_device()).manual_seed(1)
    x, F, n = _inputs(3, (9,), torch.float64, torch.float64, torch.float64, gen)
    out = trigflow_step(x, F, 0.4, SIG, t_next=0.2, noise=n, backend=name)
    ref = R.trigflow_step(x, F, 0.4, SIG, t_next=0.2, noise=n)
    # kernels compute in fp32: compare with the fp32 reference's error
    assert_rule(out, ref, R.trigflow_step(x.float(), F.float(), 0.4, SIG, t_next=0.2, noise=n.float()),
                torch.float32)


def test_uint8_rounding_ties(backend):
    """Ties (x0 + 1) * 127.5 = k + 0.5 (in fp32) round to even; clamping at 0 / 255."""
    name, _ = backend
    p = torch.tensor([0.5, 1.5, 2.5, 126.5, 127.5, 254.5, -3.0, 300.0, 0.49, 254.51])
    x0 = p / 127.5 - 1  # t = 0: x0 = x_t exactly (cos 0 = 1, sin 0 = 0)
    x = x0[None].repeat(2, 1)
    out = trigflow_step(x, torch.zeros_like(x), 0.0, SIG, out_uint8=True, backend=name)
    vals = (x + 1) * 127.5  # fp32, as scm::to_pixel; some of these land exactly on k + 0.5
    assert bool(((vals - vals.floor()) == 0.5).sum() >= 4)
    expect = torch.round(torch.clamp(vals, 0, 255)).to(torch.uint8)
    assert torch.equal(out, expect), (out, expect)


def test_deterministic(kernel_backend):
    name, _ = kernel_backend
    gen = torch.Generator(torch.get_default_device()).manual_seed(2)
    x, F, _ = _inputs(3, (301,), torch.float16, torch.float32, torch.float32, gen)
    a = trigflow_step(x, F, 1.0, SIG, t_next=0.5, seed=123, backend=name)
    b = trigflow_step(x, F, 1.0, SIG, t_next=0.5, seed=123, backend=name)
    assert torch.equal(a, b)


def test_default_seed_follows_torch_manual_seed(backend):
    name, _ = backend
    x = torch.randn(2, 33)
    F = torch.randn(2, 33)
    torch.manual_seed(7)
    a = trigflow_step(x, F, 1.0, SIG, t_next=0.5, backend=name)
    torch.manual_seed(7)
    b = trigflow_step(x, F, 1.0, SIG, t_next=0.5, backend=name)
    c = trigflow_step(x, F, 1.0, SIG, t_next=0.5, backend=name)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Philox noise: the same stream on every backend, and its statistics
# ---------------------------------------------------------------------------------------------
def _philox_py(c, k):
    """Philox4x32-10 in Python integers (independent of the int64 emulation of the reference)."""
    c, k = list(c), list(k)
    for _ in range(10):
        p0, p2 = R.PHILOX_ROUND_A * c[0], R.PHILOX_ROUND_B * c[2]
        c = [(p2 >> 32) ^ c[1] ^ k[0], p2 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + R.PHILOX_KEY_A) & 0xFFFFFFFF, (k[1] + R.PHILOX_KEY_B) & 0xFFFFFFFF]
    return c


def test_philox_known_answers_and_reference_emulation():
    # Random123 known-answer vectors of Philox4x32-10
    assert _philox_py([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox_py([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _philox_py([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    # the int64 emulation of the reference, including counters and keys above 2^32 / 2^31
    gs = [0, 1, 5, 2**31 + 3, 2**32 - 1, 2**32, 2**40 + 12345, 2**61]
    for seed in (0, 1, 2**31 + 5, 2**32 + 7, 2**63 - 1):
        r = R.philox4x32_10(torch.tensor(gs, dtype=torch.int64), seed)
        for j, g in enumerate(gs):
            expect = _philox_py([g & 0xFFFFFFFF, g >> 32, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])
            assert [int(v[j]) for v in r] == expect


@pytest.mark.parametrize("B,D", [(1, 1), (3, 7), (2, 97), (5, 1000)])
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**32 + 3, 2**63 - 1])
def test_philox_same_noise_every_backend(backend, B, D, seed):
    name, device = backend
    if name == "reference":
        got = R.philox_normal(seed, B, D, device)
    else:
        got = philox_rows(name, seed, torch.empty((B, D), device=device))
    ref64 = R.philox_normal(seed, B, D, device, torch.float64)
    assert_rule(got, ref64, R.philox_normal(seed, B, D, device), torch.float32, what="philox noise")


def test_philox_noise_in_the_step_matches_the_stream(kernel_backend):
    """The renoise term uses stream element b*D + k with k in x_t's memory order (channels_last)."""
    name, _ = kernel_backend
    x = torch.zeros(3, 2, 5, 3).contiguous(memory_format=torch.channels_last)
    out = trigflow_step(x, torch.zeros_like(x), 0.0, 1.0, t_next=math.pi / 2, seed=99, backend=name)
    eps = R.philox_noise_like(x, 99, torch.float64)
    assert_rule(out, eps, R.philox_noise_like(x, 99), torch.float32)
    assert max_err(out, eps) < 1e-4


def test_philox_statistics(kernel_backend):
    name, _ = kernel_backend
    B, D = 4, 8192
    n = philox_rows(name, 2024, torch.empty(B, D)).double().reshape(-1)
    N = n.numel()
    assert abs(float(n.mean())) < 5 / math.sqrt(N)
    assert abs(float(n.std()) - 1) < 5 * math.sqrt(0.5 / N)
    assert abs(float((n.abs() < 1).double().mean()) - 0.682689) < 5 * math.sqrt(0.2166 / N)
    assert abs(float((n.abs() > 2).double().mean()) - 0.0455) < 5 * math.sqrt(0.0434 / N)
    assert abs(float((n ** 4).mean()) - 3) < 0.15  # kurtosis
    lanes = n.reshape(-1, 4)
    for a, b in [(0, 1), (0, 2), (1, 3), (2, 3)]:  # Box-Muller pairs and the two pairs of a group
        assert abs(float(torch.corrcoef(torch.stack([lanes[:, a], lanes[:, b]]))[0, 1])) < 5 / math.sqrt(N / 4)
    lag1 = float(torch.corrcoef(torch.stack([n[:-1], n[1:]]))[0, 1])
    assert abs(lag1) < 5 / math.sqrt(N)
    # rows are different streams; a different seed is independent
    rows = n.reshape(B, D)
    assert abs(float(torch.corrcoef(rows)[0, 1])) < 5 / math.sqrt(D)
    m = philox_rows(name, 2025, torch.empty(B, D)).double().reshape(-1)
    assert abs(float(torch.corrcoef(torch.stack([n, m]))[0, 1])) < 5 / math.sqrt(N)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
CASES = ["denoise", "noise", "seed"]


def _call(fn, mode, x, F, t, s, n, seed=11, **kw):
    if mode == "denoise":
        return fn(x, F, t, SIG, **kw)
    if mode == "noise":
        return fn(x, F, t, SIG, t_next=s, noise=n, **kw)
    return fn(x, F, t, SIG, t_next=s, seed=seed, **kw)


@pytest.mark.parametrize("mode", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference_autograd(backend, mode, dtype):
    name, _ = backend
    gen = torch.Generator(torch.get_default_device()).manual_seed(3)
    x, F, n = _inputs(3, (2, 3, 7), dtype, torch.float32, dtype, gen, "channels_last")
    t, s = _times(3, gen), _times(3, gen)
    leaves = [v.detach().clone().requires_grad_() for v in (x, F, t, s, n)]
    out = _call(lambda *a, **k: trigflow_step(*a, backend=name, **k), mode, *leaves)
    w = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out.float() * w).sum(), [v for i, v in enumerate(leaves) if _used(mode, i)])
    leaves64 = [v.detach().double().requires_grad_() for v in (x, F, t, s, n)]
    out64 = _call(R.trigflow_step, mode, *leaves64)
    g64 = torch.autograd.grad((out64 * w).sum(), [v for i, v in enumerate(leaves64) if _used(mode, i)])
    leavesl = [v.detach().clone().requires_grad_() for v in (x, F, t, s, n)]
    outl = _call(R.trigflow_step, mode, *leavesl)
    gl = torch.autograd.grad((outl.float() * w).sum(), [v for i, v in enumerate(leavesl) if _used(mode, i)])
    for g, r, lo, what in zip(grads, g64, gl, ["x_t", "F", "t", "t_next", "noise"]):
        assert g.dtype == lo.dtype
        assert_rule(g, r, lo, g.dtype, what=f"grad {what}")


def _used(mode, i):
    return i < 3 or (i == 3 and mode != "denoise") or (i == 4 and mode == "noise")


@pytest.mark.parametrize("mode", CASES)
def test_gradcheck(backend, mode):
    """float64 gradcheck. The kernel backends compute in fp32: a larger step and tolerance that
    fp32 rounding (~1e-7 relative) over eps = 1e-3 justifies; the reference gets the strict one."""
    name, _ = backend
    if name == "triton":
        pytest.skip("triton takes no float64; its backward is checked against autograd above")
    gen = torch.Generator(torch.get_default_device()).manual_seed(4)
    x, F, n = _inputs(2, (3, 2), torch.float64, torch.float64, torch.float64, gen)
    t, s = _times(2, gen).double(), _times(2, gen).double()
    ins = [v.requires_grad_() for v in (x, F, t, s, n)]
    tol = FD_TOL if name == "reference" else dict(atol=2e-3, rtol=2e-3, eps=1e-3)

    def f(x, F, t, s, n):
        return _call(lambda *a, **k: trigflow_step(*a, backend=name, **k), mode, x, F, t, s, n)

    assert torch.autograd.gradcheck(f, ins, **tol)


def test_uint8_output_not_differentiable(backend):
    name, _ = backend
    x = torch.randn(2, 5, requires_grad=True)
    out = trigflow_step(x, torch.randn(2, 5), 0.3, SIG, out_uint8=True, backend=name)
    assert out.dtype == torch.uint8 and not out.requires_grad


# ---------------------------------------------------------------------------------------------
# JVP
# ---------------------------------------------------------------------------------------------
TANGENTS = ["x", "F", "t", "s", "n", "all"]


def _tangents(which, prim, gen):
    out = []
    for i, v in enumerate(prim):
        on = which == "all" or which == "xFtsn"[i]
        out.append(torch.randn(v.shape, generator=gen).to(v.dtype) if on else torch.zeros_like(v))
    return out


@pytest.mark.parametrize("mode", CASES)
@pytest.mark.parametrize("which", TANGENTS)
def test_jvp_matches_reference_and_finite_differences(backend, mode, which):
    name, _ = backend
    if mode == "denoise" and which in ("s", "n"):
        pytest.skip("no t_next / noise input without renoise")
    if mode == "seed" and which == "n":
        pytest.skip("no noise input with a seed")
    gen = torch.Generator(torch.get_default_device()).manual_seed(5)
    x, F, n = _inputs(3, (2, 4, 3), torch.float32, torch.float32, torch.float32, gen, "channels_last")
    t, s = _times(3, gen), _times(3, gen)
    prim = [x, F, t, s, n]
    tang = _tangents(which, prim, gen)

    def f(x, F, t, s, n):
        return _call(lambda *a, **k: trigflow_step(*a, backend=name, **k), mode, x, F, t, s, n)

    def f64(x, F, t, s, n):
        return _call(R.trigflow_step, mode, x, F, t, s, n)

    _, jo = torch.func.jvp(f, tuple(prim), tuple(tang))
    p64, t64 = tuple(v.double() for v in prim), tuple(v.double() for v in tang)
    _, j64 = torch.func.jvp(f64, p64, t64)
    _, jl = torch.func.jvp(f64, tuple(prim), tuple(tang))
    assert_rule(jo, j64, jl, torch.float32, what="jvp")
    # the float64 oracle agrees with a central finite difference
    h = 1e-6
    fd = (f64(*[p + h * d for p, d in zip(p64, t64)]) - f64(*[p - h * d for p, d in zip(p64, t64)])) / (2 * h)
    torch.testing.assert_close(j64, fd, **FD_TOL)
    # forward-mode AD with dual tensors gives the same tangent
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, d) for p, d in zip(prim, tang)]
        jd = fwAD.unpack_dual(f(*duals)).tangent
    torch.testing.assert_close(jd, jo, atol=1e-6, rtol=1e-5)


def test_jvp_float64_finite_difference_of_the_kernel(backend):
    """Central difference of the kernel itself (float64 inputs, fp32 arithmetic: step 1e-3)."""
    name, _ = backend
    if name == "triton":
        pytest.skip("triton takes no float64")
    gen = torch.Generator(torch.get_default_device()).manual_seed(6)
    x, F, n = _inputs(2, (5,), torch.float64, torch.float64, torch.float64, gen)
    t, s = _times(2, gen).double(), _times(2, gen).double()
    prim = (x, F, t, s, n)
    tang = tuple(_tangents("all", prim, gen))

    def f(*a):
        return _call(lambda *b, **k: trigflow_step(*b, backend=name, **k), "noise", *a)

    _, j = torch.func.jvp(f, prim, tang)
    h = 1e-3
    fd = (f(*[p + h * d for p, d in zip(prim, tang)]) - f(*[p - h * d for p, d in zip(prim, tang)])) / (2 * h)
    torch.testing.assert_close(j, fd, atol=2e-3, rtol=2e-3)


def test_jvp_inside_a_larger_function_and_higher_order(backend):
    """The op deep inside a JVP'ed function, and forward-over-reverse (jvp of grad)."""
    name, _ = backend
    gen = torch.Generator(torch.get_default_device()).manual_seed(7)
    x = torch.randn(2, 3, 4, generator=gen)
    t = _times(2, gen)
    v = torch.randn(x.shape, generator=gen)

    def model(fn, x, t, **kw):
        Fx = torch.tanh(x * 1.3) + t[:, None, None]
        y = fn(x, Fx, t, SIG, t_next=t * 0.5, seed=5, **kw)
        return (y ** 2).sum() * y.mean()

    fk = lambda x, t: model(trigflow_step, x, t, backend=name)  # noqa: E731
    fr = lambda x, t: model(R.trigflow_step, x, t)  # noqa: E731
    _, jk = torch.func.jvp(fk, (x, t), (v, torch.ones(2)))
    _, jr = torch.func.jvp(fr, (x.double(), t.double()), (v.double(), torch.ones(2, dtype=torch.float64)))
    torch.testing.assert_close(jk.double(), jr, atol=1e-4, rtol=1e-4)
    hk = torch.func.jvp(torch.func.grad(fk, argnums=(0, 1)), (x, t), (v, torch.ones(2)))[1]
    hr = torch.func.jvp(torch.func.grad(fr, argnums=(0, 1)), (x.double(), t.double()),
                        (v.double(), torch.ones(2, dtype=torch.float64)))[1]
    for a, b in zip(hk, hr):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any kernel runs
# ---------------------------------------------------------------------------------------------
def test_bad_inputs(backend):
    name, _ = backend
    x = torch.randn(2, 3)
    F = torch.randn(2, 3)
    call = lambda *a, **k: trigflow_step(*a, backend=name, **k)  # noqa: E731
    cases = [
        (TypeError, r"x_t must be a torch.Tensor, got list", lambda: call([1.0], F, 0.5)),
        (TypeError, r"x_t must have dtype .* got torch.int64", lambda: call(x.long(), F, 0.5)),
        (ValueError, r"x_t must have at least 1 dims, got shape \(\)", lambda: call(torch.tensor(1.0), F, 0.5)),
        (ValueError, r"x_t must not be empty", lambda: call(torch.empty(0, 3), torch.empty(0, 3), 0.5)),
        (TypeError, r"F must have dtype .* got torch.int32", lambda: call(x, F.int(), 0.5)),
        (ValueError, r"F must have the shape of x_t \(2, 3\), got \(2, 4\)", lambda: call(x, torch.randn(2, 4), 0.5)),
        (ValueError, r"sigma_d must be > 0, got -1.0", lambda: call(x, F, 0.5, -1.0)),
        (ValueError, r"sigma_d must be finite", lambda: call(x, F, 0.5, float("nan"))),
        (TypeError, r"sigma_d must be a real number, got str", lambda: call(x, F, 0.5, "a")),
        (ValueError, r"t must be finite", lambda: call(x, F, float("inf"))),
        (ValueError, r"t must be finite, got 1 non-finite", lambda: call(x, F, torch.tensor([0.1, float("nan")]))),
        (ValueError, r"t must be a scalar or hold one value per sample, shape \(2,\)",
         lambda: call(x, F, torch.rand(3))),
        (ValueError, r"t_next must be finite", lambda: call(x, F, 0.5, t_next=float("nan"))),
        (ValueError, r"noise must have the shape of x_t \(2, 3\), got \(2, 2\)",
         lambda: call(x, F, 0.5, t_next=0.2, noise=torch.randn(2, 2))),
        (TypeError, r"noise must have dtype .* got torch.int64",
         lambda: call(x, F, 0.5, t_next=0.2, noise=torch.ones(2, 3, dtype=torch.long))),
        (ValueError, r"either noise or seed, not both", lambda: call(x, F, 0.5, t_next=0.2, noise=F, seed=1)),
        (ValueError, r"noise .* needs t_next, got t_next=None", lambda: call(x, F, 0.5, noise=F)),
        (ValueError, r"seed .* needs t_next, got t_next=None", lambda: call(x, F, 0.5, seed=3)),
        (ValueError, r"seed must be >= 0, got -1", lambda: call(x, F, 0.5, t_next=0.2, seed=-1)),
        (ValueError, r"seed must be <= 9223372036854775807, got 9223372036854775808",
         lambda: call(x, F, 0.5, t_next=0.2, seed=2**63)),
        (TypeError, r"seed must be an int, got float", lambda: call(x, F, 0.5, t_next=0.2, seed=1.5)),
        (TypeError, r"seed must be an int, got bool", lambda: call(x, F, 0.5, t_next=0.2, seed=True)),
        (ValueError, r"out_uint8=True .* cannot renoise; got t_next=0.2",
         lambda: call(x, F, 0.5, t_next=0.2, out_uint8=True)),
        (TypeError, r"out_uint8 must be a bool, got int", lambda: call(x, F, 0.5, out_uint8=1)),
        (ValueError, r"backend: expected one of", lambda: trigflow_step(x, F, 0.5, backend="tpu")),
    ]
    if name == "triton":
        cases.append((TypeError, r"backend 'triton' needs x_t in float32/float16/bfloat16, got torch.float64",
                      lambda: call(x.double(), F, 0.5)))
    for exc, match, fn in cases:
        with pytest.raises(exc, match=match):
            fn()


# ---------------------------------------------------------------------------------------------
# Schema ops: opcheck (cpu), fake impls; AOT specs
# ---------------------------------------------------------------------------------------------
@pytest.mark.cpu
@pytest.mark.skipif(not scm_backend.extension_available(), reason="scm_kernels._C not built")
def test_opcheck_schema_ops():
    import scm_kernels.trigflow_step.function  # noqa: F401  (registers the fake impls)

    B, D = 3, 37
    x = torch.randn(B, D)
    F = torch.randn(B, 2 * D, dtype=torch.float16)[:, :D]  # row stride 2D
    n = torch.randn(1, D).expand(B, D)  # row stride 0
    t, s = torch.rand(B), torch.rand(2 * B)[::2]
    op, bop = torch.ops.scm.trigflow_step.default, torch.ops.scm.trigflow_step_backward.default
    for args in [(x, F, t, None, None, SIG, 0, 0, False), (x, F, t, None, None, SIG, 0, 0, True),
                 (x, F, t, s, n, SIG, 0, 1, False), (x, F, t, s, None, SIG, 2**40 + 1, 2, False),
                 (x, F, t, s, None, SIG, 0, 3, False)]:
        torch.library.opcheck(op, args)
    for args in [(x, t, None, SIG, False, True, True, torch.float32, torch.float16),
                 (x, t, s, SIG, True, False, True, torch.float32, torch.bfloat16),
                 (x, t, s, SIG, True, True, False, torch.float32, torch.float32)]:
        torch.library.opcheck(bop, args)


@pytest.mark.cpu
@pytest.mark.skipif(not scm_backend.extension_available(), reason="scm_kernels._C not built")
def test_schema_op_takes_contiguous_nd_tensors():
    """The fast path passes contiguous (B, ...) tensors straight to the schema op: the same numbers
    as the (B, D) views, x_t's shape out, and non-contiguous N-d inputs refused."""
    import scm_kernels.trigflow_step.function  # noqa: F401  (registers the fake impls)

    op = torch.ops.scm.trigflow_step.default
    x, F, n = torch.randn(3, 2, 5, 7), torch.randn(3, 2, 5, 7, dtype=torch.bfloat16), torch.randn(3, 2, 5, 7)
    t, s = torch.rand(3), torch.rand(3)
    for args in [(x, F, t, None, None, SIG, 0, 0, False), (x, F, t, None, None, SIG, 0, 0, True),
                 (x, F, t, s, n, SIG, 0, 1, False), (x, F, t, s, None, SIG, 11, 2, False)]:
        out = op(*args)
        flat = op(args[0].view(3, -1), args[1].view(3, -1), *args[2:4],
                  None if args[4] is None else args[4].view(3, -1), *args[5:])
        assert out.shape == x.shape
        assert torch.equal(out.view(3, -1), flat)
        torch.library.opcheck(op, args)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(x.transpose(2, 3), F.transpose(2, 3), t, None, None, SIG, 0, 0, False)
    with pytest.raises(RuntimeError, match="must have shape"):
        op(x, F[:, :1], t, None, None, SIG, 0, 0, False)


@pytest.mark.static
def test_aot_specs_cover_the_launchers():
    from scm_kernels.trigflow_step import triton_kernels as tk

    fwd = [s for s in tk.AOT_SPECS if s.kernel_name == "_trigflow_step_fwd"]
    bwd = [s for s in tk.AOT_SPECS if s.kernel_name == "_trigflow_step_bwd"]
    modes = {(s.constexprs["MODE"], s.constexprs["OUT_U8"]) for s in fwd}
    assert modes == {(0, False), (0, True), (1, False), (2, False), (3, False)}
    assert len(fwd) == 9 * 7 and len(bwd) == 9 * 2 * 2 + 3 * 2
    for spec in tk.AOT_SPECS:
        params = spec.fn.arg_names
        assert list(spec.signature) == params, spec.kernel_name
        assert all(spec.signature[k] == "constexpr" for k in spec.constexprs)
