"""Tests of scm_kernels.group_norm (A28-A30) and scm_kernels.nn.AdaptiveGroupNorm: every backend
against the float64 composite F.group_norm -> mul/add -> silu (the 2x-PyTorch rule of
tests/conftest.py) for the output, the gradients w.r.t. x, weight, bias, scale, shift and the JVP;
hypothesis shapes (C = 1, groups = 1, groups = C, one spatial element, odd sizes, 3-D to 5-D inputs,
channels_last, batch slices), split groups, gradcheck, finite differences, forward-AD dual tensors,
large-offset numerics, determinism, layouts without copies, channels_last JVP, argument errors,
opcheck, torch.compile and the AOT specs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scm_kernels import backend as _backend
from scm_kernels.group_norm import function as gn_function
from scm_kernels.group_norm import group_norm, reference
from tests.conftest import DTYPES, FD_TOL, assert_rule, max_err

ref_gn = reference.group_norm
_interp = _backend.triton_interpret() and _backend.triton_available()
_has_ext = _backend.extension_available()


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _layout(x: torch.Tensor, layout: str, gen) -> torch.Tensor:
    """x (float64, contiguous) in the given memory layout, same values."""
    if layout == "channels_last":
        N, C, *sp = x.shape
        base = torch.empty((N, *sp, C), dtype=x.dtype)
        return base.copy_(x.movedim(1, -1)).movedim(-1, 1)
    if layout == "slice":  # every other sample of a bigger batch
        big = torch.randn((2 * x.shape[0],) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
        big[::2] = x
        return big[::2]
    return x


def make_case(N, C, G, spatial, dtype=torch.float32, layout="contig", weight=True, bias=True, scale=True,
              shift=True, pdtype=None, act="silu", offset=0.0, seed=0):
    """Keyword arguments of one group_norm call (x in `dtype` and `layout`, parameters in pdtype)."""
    gen = torch.Generator().manual_seed(seed)
    pdtype = pdtype or dtype
    x = torch.randn((N, C) + tuple(spatial), generator=gen, dtype=torch.float64) * 1.5 + offset
    kw = dict(x=_layout(x.to(dtype), layout, gen), num_groups=G, eps=1e-5, activation=act)

    def p(shape, center, spread):
        return (center + spread * torch.randn(shape, generator=gen, dtype=torch.float64)).to(pdtype)

    kw["weight"] = p((C,), 1.0, 0.5) if weight else None
    kw["bias"] = p((C,), 0.0, 0.5) if bias else None
    kw["scale"] = p((N, C), 1.0, 0.3) if scale else None
    kw["shift"] = p((N, C), 0.0, 0.5) if shift else None
    return kw


PARAMS = ("weight", "bias", "scale", "shift")


def _call(kw, name):
    kw = dict(kw)
    return group_norm(kw.pop("x"), kw.pop("num_groups"), kw.pop("weight"), kw.pop("bias"), kw.pop("eps"),
                      scale=kw.pop("scale"), shift=kw.pop("shift"), activation=kw.pop("activation"), backend=name)


def _ref(kw):
    return ref_gn(kw["x"], kw["num_groups"], kw["weight"], kw["bias"], kw["eps"], kw["scale"], kw["shift"],
                  kw["activation"])


def _cast(kw, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _to(device, kw):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _all(fn, kw, dy, tangents):
    """(y, gradients of (x, weight, bias, scale, shift) for upstream dy, JVP along tangents)."""
    names = ["x"] + [k for k in PARAMS if kw[k] is not None]
    leaves = {k: kw[k].detach().clone().requires_grad_() for k in names}
    y = fn({**kw, **leaves})
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(y.dtype))
    _, jvp = torch.func.jvp(lambda *p: fn({**kw, **dict(zip(names, p))}), tuple(kw[k] for k in names),
                            tuple(tangents[k].to(kw[k].dtype) for k in names))
    return y.detach(), dict(zip(names, grads)), jvp


def check_against_reference(name, device, kw, what=""):
    """Backend `name` vs the float64 oracle and PyTorch's own result in the inputs' dtypes: y, every
    gradient and the JVP (tolerance rule of tests/conftest.py); y keeps x's dtype and layout."""
    dtype = kw["x"].dtype
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(kw["x"].shape, generator=gen, dtype=torch.float64)
    tangents = {k: torch.randn(kw[k].shape, generator=gen, dtype=torch.float64)
                for k in ("x",) + PARAMS if kw[k] is not None}
    k = _all(lambda a: _call(a, name), _to(device, kw), dy.to(device), _to(device, tangents))
    r64 = _all(_ref, _cast(kw, torch.float64), dy, tangents)
    rlp = _all(_ref, kw, dy, tangents)
    y = k[0]
    assert y.dtype == dtype and y.shape == kw["x"].shape
    if name != "reference" and kw["x"].dim() in (4, 5) and kw["x"].shape[1] > 1 and kw["x"][0, 0].numel() > 1:
        fmt = torch.channels_last if kw["x"].dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt) == (gn_function.layout_of(kw["x"]) is True)
    assert_rule(y.cpu(), r64[0], rlp[0], dtype, what=f"{what} y")
    for g in k[1]:
        assert k[1][g].dtype == kw[g].dtype and k[1][g].shape == kw[g].shape
        assert_rule(k[1][g].cpu(), r64[1][g], rlp[1][g], dtype, what=f"{what} d{g}")
    assert_rule(k[2].cpu(), r64[2], rlp[2], dtype, what=f"{what} jvp")


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.reference
def test_reference_matches_formulas():
    """The reference against (A28) written out with explicit group statistics, in float64."""
    kw = _cast(make_case(2, 6, 3, (4, 5), seed=3), torch.float64)
    x = kw["x"]
    xg = x.reshape(2, 3, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    xh = ((xg - mu) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    a = (xh * kw["weight"][:, None, None] + kw["bias"][:, None, None]) * kw["scale"][:, :, None, None] \
        + kw["shift"][:, :, None, None]
    torch.testing.assert_close(_ref(kw), a * torch.sigmoid(a), rtol=1e-12, atol=1e-12)


@pytest.mark.reference
def test_reference_derivative_formulas():
    """(A29) and (A30) as written in algorithm.md equal autograd / forward AD of the reference."""
    kw = _cast(make_case(2, 6, 3, (5,), seed=4), torch.float64)
    x, w, b, s, sh = kw["x"], kw["weight"], kw["bias"], kw["scale"], kw["shift"]
    gen = torch.Generator().manual_seed(5)
    xd, wd, bd, sd, shd, dy = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, w, b, s, sh, x))
    xg = x.reshape(2, 3, -1)
    mu = xg.mean(-1, keepdim=True)
    r = 1 / torch.sqrt(((xg - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    xh = ((xg - mu) * r).reshape(x.shape)
    W, B, S, SH = w[:, None], b[:, None], s[:, :, None], sh[:, :, None]
    a = (xh * W + B) * S + SH
    sig = torch.sigmoid(a)
    dsilu = sig * (1 + a * (1 - sig))
    # (A29)
    xdg = xd.reshape(2, 3, -1)
    xhg = xh.reshape(2, 3, -1)
    xhd = (r * (xdg - xdg.mean(-1, keepdim=True) - xhg * (xhg * xdg).mean(-1, keepdim=True))).reshape(x.shape)
    ad = (xhd * W + xh * wd[:, None] + bd[:, None]) * S + (xh * W + B) * sd[:, :, None] + shd[:, :, None]
    _, jvp = torch.func.jvp(lambda *p: ref_gn(p[0], 3, p[1], p[2], 1e-5, p[3], p[4], "silu"), (x, w, b, s, sh),
                            (xd, wd, bd, sd, shd))
    torch.testing.assert_close(jvp, dsilu * ad, rtol=1e-10, atol=1e-10)
    # (A30)
    da = dy * dsilu
    dxh = (da * S * W).reshape(2, 3, -1)
    dx = (r * (dxh - dxh.mean(-1, keepdim=True) - xhg * (dxh * xhg).mean(-1, keepdim=True))).reshape(x.shape)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, s, sh)]
    g = torch.autograd.grad(ref_gn(leaves[0], 3, *leaves[1:3], 1e-5, *leaves[3:], "silu"), leaves, dy)
    expect = (dx, (da * S * xh).sum((0, 2)), (da * S).sum((0, 2)), (da * (xh * W + B)).sum(2), da.sum(2))
    for got, want in zip(g, expect):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Every backend against the oracle
# ---------------------------------------------------------------------------------------------
# (C, G) pairs: C = 1, groups = 1, groups = C, odd channel counts.
CG = [(1, 1), (4, 1), (6, 6), (6, 3), (10, 5), (12, 4), (3, 3), (8, 2)]
SPATIAL = [(1,), (7,), (1, 1), (3, 5), (4, 4), (2, 3, 3), (1, 5, 2), (13,)]


@st.composite
def cases(draw):
    C, G = draw(st.sampled_from(CG))
    spatial = draw(st.sampled_from(SPATIAL))
    layouts = ["contig", "slice"] + (["channels_last"] if C > 1 else [])
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        N=draw(st.sampled_from([1, 2, 3])), C=C, G=G, spatial=spatial, dtype=dtype,
        layout=draw(st.sampled_from(layouts)), weight=draw(st.booleans()), bias=draw(st.booleans()),
        scale=draw(st.booleans()), shift=draw(st.booleans()),
        pdtype=draw(st.sampled_from([dtype, torch.float32])), act=draw(st.sampled_from([None, "silu"])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=cases())
def test_matches_reference(kernel_backend, case):
    name, device = kernel_backend
    check_against_reference(name, device, make_case(**case), what=f"{name} {case}")


@pytest.mark.parametrize("N,C,G,spatial,layout", [
    (2, 32, 4, (9, 10), "contig"),       # several tiles per group (Triton), blocks (CPU)
    (2, 64, 2, (3, 50), "channels_last"),
    (1, 8, 8, (97,), "contig"),          # one channel per group
    (1, 6, 1, (33, 35), "contig"),       # several CPU blocks per channel
    (3, 12, 3, (2, 3, 4), "channels_last"),
])
def test_awkward_shapes(kernel_backend, N, C, G, spatial, layout):
    name, device = kernel_backend
    kw = make_case(N, C, G, spatial, layout=layout, seed=N + C)
    check_against_reference(name, device, kw, what=f"{name} {N},{C},{G},{spatial},{layout}")


@pytest.mark.parametrize("N,C,G", [(1, 1, 1), (2, 4, 4)])
def test_one_element_groups(kernel_backend, N, C, G):
    """One element per group (groups = C, one spatial element): x^ = 0 whatever x is, so dx = 0
    exactly; the kernels' dx = r (da A - m1 - x^ m2) alone leaves rounding scaled by r = eps^(-1/2)
    (a case the thorough hypothesis profile found over the 2x rule's floor)."""
    name, device = kernel_backend
    kw = make_case(N, C, G, (1,), weight=True, bias=False, scale=False, shift=False, act=None, seed=0)
    check_against_reference(name, device, kw, what=f"{name} {N},{C},{G}")
    x = kw["x"].to(device).requires_grad_()
    y = group_norm(x, G, kw["weight"].to(device), activation="silu", backend=name)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert not dx.any()


def test_reference_backend(backend):
    """The public function on every backend (the reference included), bf16 x with fp32 parameters."""
    name, device = backend
    kw = make_case(2, 8, 4, (3, 5), dtype=torch.bfloat16, pdtype=torch.float32, layout="channels_last", seed=11)
    check_against_reference(name, device, kw, what=name)


@pytest.fixture
def split_groups(monkeypatch):
    """Makes the Triton launcher split every group over several programs (as on a GPU at batch 1,
    here also for small groups)."""
    from scm_kernels.group_norm import triton_kernels

    monkeypatch.setattr(triton_kernels, "MIN_PER_PROGRAM", 1)
    if _interp:
        monkeypatch.setattr(triton_kernels, "INTERPRETER_TARGET_PROGRAMS", 64)


@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_split_groups(kernel_backend, split_groups, layout):
    """Groups split over several programs / tasks (partial statistics merged in a second stage):
    Triton with the split forced; the CPU splits groups of >= 2 x 16384 elements when N * G < 64."""
    name, device = kernel_backend
    if name == "triton":
        from scm_kernels.group_norm import triton_kernels

        shape = (1, 8, 2, (5, 300))
        bc, bs, nsplit, _ = triton_kernels.plan(1, 8, 1500, 2, torch.device(device))
        assert nsplit > 1
    else:
        shape = (1, 4, 1, (96, 96))  # M = 36864: 2 tasks per group on the CPU
    N, C, G, spatial = shape
    kw = make_case(N, C, G, spatial, layout=layout, seed=13)
    check_against_reference(name, device, kw, what=f"{name} split {layout}")


@pytest.fixture
def resident_groups(monkeypatch):
    """Makes the Triton forward keep each group in registers (mode 3, as on a GPU when the padded
    group fits RESIDENT_TILES and N*G programs fill it), here with small tiles and for any group."""
    from scm_kernels.group_norm import triton_kernels

    monkeypatch.setattr(triton_kernels, "RESIDENT_TILES", ((256, 1), (1024, 2)))
    monkeypatch.setattr(triton_kernels, "RESIDENT_MIN", 1)
    monkeypatch.setattr(triton_kernels, "RESIDENT_MAX_BC", 8)
    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 1)
    if _interp:
        monkeypatch.setattr(triton_kernels, "INTERPRETER_RESIDENT", True)


@pytest.mark.parametrize("N,C,G,spatial,layout", [
    (2, 6, 2, (5, 7), "contig"),         # Cg = 3, S = 35: padded to a (4, 64) tile of 256
    (3, 16, 2, (10, 9), "channels_last"),  # Cg = 8, S = 90: (8, 128) of 1024
    (1, 4, 4, (300,), "contig"),         # one channel per group, S = 300: (1, 1024)
    (2, 8, 4, (2, 3, 4), "channels_last"),
])
def test_resident_groups(kernel_backend, resident_groups, N, C, G, spatial, layout):
    """The forward's one-read mode 3 (the group held in registers) on groups that are not tile
    multiples, both layouts; mean and rstd too (the JVP and backward read them)."""
    name, device = kernel_backend
    if name != "triton":
        pytest.skip("mode 3 is the Triton forward's")
    from scm_kernels.group_norm import triton_kernels

    S = math.prod(spatial)
    assert triton_kernels.resident_tile(N, C, S, G, torch.device(device)) is not None
    kw = make_case(N, C, G, spatial, layout=layout, seed=N * C + S)
    check_against_reference(name, device, kw, what=f"{name} resident {N},{C},{G},{spatial},{layout}")
    x = kw["x"].to(device).reshape(N, C, -1)
    _, mean, rstd = triton_kernels.group_norm(x, None, None, None, None, G, 1e-5, False)
    xg = kw["x"].double().reshape(N, G, -1)
    assert torch.allclose(mean.cpu().double(), xg.mean(-1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(rstd.cpu().double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4)


def test_resident_unet_shape(kernel_backend):
    """On a GPU, the shipped mode 3 at a U-Net shape (16 x 512 x 32 x 32, G = 32: 512 programs of
    16 x 1024), bf16 and fp32, both layouts, against the float64 reference (the 2x rule)."""
    name, device = kernel_backend
    if name != "triton" or device != "cuda":
        pytest.skip("mode 3 runs at this size on a GPU only")
    from scm_kernels.group_norm import triton_kernels

    assert triton_kernels.resident_tile(16, 512, 1024, 32, torch.device(device)) is not None
    for dtype in (torch.bfloat16, torch.float32):
        for layout in ("contig", "channels_last"):
            kw = make_case(16, 512, 32, (32, 32), dtype=dtype, pdtype=torch.float32, layout=layout, seed=29)
            check_against_reference(name, device, kw, what=f"resident U-Net {dtype} {layout}")


def test_resident_tile_choice():
    """On a GPU: mode 3 for the U-Net shapes whose padded group has 16384 elements and whose N*G
    programs fill the GPU; never for a batch-1 call (split instead), a group too wide or too small."""
    from scm_kernels.group_norm import triton_kernels as tk

    cuda = torch.device("cuda")
    assert tk.resident_tile(32, 512, 32 * 32, 32, cuda) == (16, 1024, 8)
    assert tk.resident_tile(32, 384, 24 * 24, 32, cuda) == (16, 1024, 8)  # Cg = 12, S = 576: padded
    assert tk.resident_tile(64, 768, 16 * 16, 32, cuda) is None      # 8192 elements: mode 0
    assert tk.resident_tile(32, 256, 64 * 64, 32, cuda) is None      # 32768 elements
    assert tk.resident_tile(1, 512, 32 * 32, 32, cuda) is None       # N*G = 32: split
    assert tk.resident_tile(32, 32 * 32, 16 * 16, 32, cuda) is None  # Cg = 32 > RESIDENT_MAX_BC
    assert tk.resident_tile(32, 512, 32 * 32, 32, torch.device("cpu")) is None
    assert tk.resident_tile(32, 512, 32 * 32, 32, cuda, torch.float64) is None  # its tile spills
    assert tk.resident_tile(32, 512, 32 * 32, 32, cuda, torch.bfloat16) == (16, 1024, 8)


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------
SILU_EXTREMES = [-math.inf, -1e30, -100.0, -88.8, -88.7, -87.5, -80.5, -20.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 20.0,
                 80.5, 88.8, 100.0, 1e30, math.inf, math.nan]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, len(SILU_EXTREMES)], ids=["G=1", "G=C"])
def test_silu_at_extreme_arguments(kernel_backend, layout, groups):
    """SiLU of the modulated value a = shift (weight 0) over the whole float range: the CPU forward's
    vector SiLU (saturating 2^k, clamped exponent) and every other kernel agree with torch's float64
    silu: finite values within a few ulp (or below 1e-30), +inf at +inf, NaN at NaN and -inf
    (as torch: -inf * 0). 37 positions: a vector tail in every row."""
    name, device = kernel_backend
    C = len(SILU_EXTREMES)
    a = torch.tensor(SILU_EXTREMES, dtype=torch.float32)
    x = torch.randn(2, C, 37, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        x = x[..., None].contiguous(memory_format=torch.channels_last)
    shift = a.expand(2, C).contiguous()
    y = group_norm(x.to(device), groups, torch.zeros(C, device=device), scale=torch.ones(2, C, device=device),
                   shift=shift.to(device), activation="silu", backend=name).cpu().reshape(2, C, -1)
    want = F.silu(a.double())[None, :, None].expand_as(y)
    got = y.double()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), (got[0, :, 0], want[0, :, 0])
    ok = ~nan
    assert torch.equal(torch.isinf(got[ok]), torch.isinf(want[ok]))
    fin = ok & torch.isfinite(want)
    err = (got[fin] - want[fin]).abs()
    # values below 1e-30 in magnitude (a < -75) may flush to -0, as the portable path does below -80
    assert bool((err <= 4 * 2.0**-23 * want[fin].abs() + 1e-30).all()), (got[0, :, 0], want[0, :, 0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_silu_grad_at_extreme_arguments(kernel_backend, layout):
    """SiLU'(a) over the whole float range, through the JVP (tangent of shift only: y_dot = SiLU'(a)
    shift_dot) and the backward (dshift = sum over positions of dy SiLU'(a)): every kernel's sigmoid,
    saturated by its clamped exponent, agrees with float64 autograd of torch's silu at finite a (within
    a few ulp, or 1e-30) and is NaN at NaN and at +-inf (as torch: inf * 0)."""
    name, device = kernel_backend
    C = len(SILU_EXTREMES)
    a = torch.tensor(SILU_EXTREMES, dtype=torch.float64)
    x = torch.randn(2, C, 37, generator=torch.Generator().manual_seed(4))
    if layout == "channels_last":
        x = x[..., None].contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    w, s = torch.zeros(C, device=device), torch.ones(2, C, device=device)
    shift = a.float().expand(2, C).contiguous().to(device)

    def f(sh):
        return group_norm(x, C, w, scale=s, shift=sh, activation="silu", backend=name)

    a64 = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.silu(a64), a64, torch.ones_like(a64))  # SiLU'(a), float64
    _, yd = torch.func.jvp(f, (shift,), (torch.ones_like(shift),))
    sh = shift.clone().requires_grad_(True)
    (dsh,) = torch.autograd.grad(f(sh), sh, torch.ones_like(x))
    got = {"jvp": yd.cpu().double().reshape(2, C, -1), "dshift": dsh.cpu().double()[..., None] / 37.0}
    for what, g in got.items():
        w_ = want[None, :, None].expand_as(g)
        nan = torch.isnan(w_) | torch.isinf(a)[None, :, None].expand_as(g)
        assert torch.equal(torch.isnan(g), nan), (what, g[0, :, 0], w_[0, :, 0])
        fin = ~nan
        err = (g[fin] - w_[fin]).abs()
        # dshift sums 37 equal terms in fp32: a few more ulp of rounding
        ulps = 4 if what == "jvp" else 8
        assert bool((err <= ulps * 2.0**-23 * w_[fin].abs() + 1e-30).all()), (what, g[0, :, 0], w_[0, :, 0])


def test_large_offset(kernel_backend):
    """x * 0.01 + 1e4 in fp32: at least as accurate as PyTorch's own fp32 group_norm (within 2x);
    the one-pass variance E[x^2] - E[x]^2 gives garbage on the same data."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(17)
    x64 = torch.randn(2, 8, 16, 16, generator=gen, dtype=torch.float64) * 0.01 + 1e4
    x = x64.float()
    w = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    y = group_norm(x.to(device), 4, w.float().to(device), backend=name).cpu()
    ref64 = F.group_norm(x.double(), 4, w)
    torch32 = F.group_norm(x, 4, w.float())
    assert_rule(y, ref64, torch32, torch.float32, what=f"{name} large offset")
    # A real normalization, not "within 2x of something bad": the only error left is the fp32
    # rounding of mu near 1e4 (half an ulp, 5e-4) relative to sigma = 0.01, as in PyTorch.
    assert max_err(y, ref64) < 0.25
    xg = x.reshape(2, 4, -1)
    naive_var = (xg * xg).mean(-1) - xg.mean(-1) ** 2
    true_var = x.double().reshape(2, 4, -1).var(-1, unbiased=False)
    assert float((naive_var.double() - true_var).abs().max()) > 10 * float(true_var.max())
    # backward and JVP stay accurate too
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xk = x.to(device).requires_grad_()
    gk = torch.autograd.grad(group_norm(xk, 4, backend=name, activation="silu"), xk, dy.float().to(device))[0]
    x64r = x.double().requires_grad_()
    g64 = torch.autograd.grad(F.silu(F.group_norm(x64r, 4)), x64r, dy)[0]
    x32r = x.clone().requires_grad_()
    g32 = torch.autograd.grad(F.silu(F.group_norm(x32r, 4)), x32r, dy.float())[0]
    assert_rule(gk.cpu(), g64, g32, torch.float32, what=f"{name} large offset dx")
    _, jk = torch.func.jvp(lambda a: group_norm(a, 4, backend=name), (x.to(device),), (dy.float().to(device),))
    _, j64 = torch.func.jvp(lambda a: F.group_norm(a, 4), (x.double(),), (dy,))
    _, j32 = torch.func.jvp(lambda a: F.group_norm(a, 4), (x,), (dy.float(),))
    assert_rule(jk.cpu(), j64, j32, torch.float32, what=f"{name} large offset jvp")


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("C,G,H,W", [(16, 4, 48, 47), (24, 8, 37, 41)])
def test_channels_last_forward_several_chunks(kernel_backend, offset, C, G, H, W):
    """channels_last with several groups on spatial sizes whose rows span several chunks of the CPU
    kernel (partial last chunk; with C = 24, chunks of 682 rows handled as super-rows of 10 rows plus
    2 or 3 rows left over), with every operand and SiLU; with x * 0.01 + 1e4 as accurate as PyTorch's
    own fp32 group_norm (within 2x)."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(23)
    N = 2
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) * (0.01 if offset else 1.0) + offset
    w, b = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5, torch.randn(C, generator=gen, dtype=torch.float64)
    sc, sh = 1 + 0.2 * torch.randn(N, C, generator=gen, dtype=torch.float64), torch.randn(N, C, generator=gen,
                                                                                          dtype=torch.float64)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    y = group_norm(x.to(device), G, w.float().to(device), b.float().to(device), scale=sc.float().to(device),
                   shift=sh.float().to(device), activation="silu", backend=name).cpu()
    assert y.is_contiguous(memory_format=torch.channels_last)

    def composite(a, dt):
        z = F.group_norm(a.to(dt), G, w.to(dt), b.to(dt)) * sc.to(dt)[:, :, None, None] + sh.to(dt)[:, :, None, None]
        return F.silu(z)

    assert_rule(y, composite(x, torch.float64), composite(x, torch.float32), torch.float32,
                what=f"{name} channels_last offset {offset}")
    # JVP along x (the CPU kernel's channels-last JVP reduces over the same chunks)
    xd = torch.randn(x.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    _, yd = torch.func.jvp(lambda a: group_norm(a, G, w.float().to(device), b.float().to(device),
                                                scale=sc.float().to(device), shift=sh.float().to(device),
                                                activation="silu", backend=name), (x.to(device),),
                           (xd.float().to(device),))
    # (PyTorch's own JVP of group_norm fails on channels_last inputs: the references take contiguous ones)
    _, yd64 = torch.func.jvp(lambda a: composite(a, torch.float64), (x.double().contiguous(),), (xd.contiguous(),))
    _, yd32 = torch.func.jvp(lambda a: composite(a, torch.float32), (x.contiguous(),), (xd.float().contiguous(),))
    assert_rule(yd.cpu(), yd64, yd32, torch.float32, what=f"{name} channels_last jvp offset {offset}")
    # backward: gradients of x, weight, bias, scale, shift
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def grads(fn, dt, dev):
        leaves = [a.to(dt).to(dev).detach().requires_grad_() for a in (x, w, b, sc, sh)]
        return [g.cpu() for g in torch.autograd.grad(fn(*leaves), leaves, dy.to(dt).to(dev))]

    ours = grads(lambda a, ww, bb, ss, hh: group_norm(a, G, ww, bb, scale=ss, shift=hh, activation="silu",
                                                       backend=name), torch.float32, device)

    def comp(a, ww, bb, ss, hh):
        return F.silu(F.group_norm(a, G, ww, bb) * ss[:, :, None, None] + hh[:, :, None, None])

    for k, (g, g64, g32) in enumerate(zip(ours, grads(comp, torch.float64, "cpu"), grads(comp, torch.float32, "cpu"))):
        assert_rule(g, g64, g32, torch.float32, what=f"{name} channels_last grad {k} offset {offset}")

# ---------------------------------------------------------------------------------------------
# Derivatives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_gradcheck(backend, layout):
    """gradcheck of backward and forward AD w.r.t. all five inputs on float64 inputs. The kernels
    compute in fp32, so their differences use eps = 1e-3 (FD error ~eps^2, rounding ~1e-7 / eps),
    in gradcheck's fast mode (random projections of the Jacobian: a few calls instead of one per
    element, which the Triton interpreter needs); the reference is checked in full with the float64
    tolerances."""
    name, device = backend
    if name == "triton" and layout == "contig":
        pytest.skip("the interpreter is slow; contiguous inputs are covered by the other tests")
    kw = _to(device, _cast(make_case(2, 4, 2, (3, 2), layout=layout, seed=19), torch.float64))

    def f(x, w, b, s, sh):
        return _call({**kw, "x": x, "weight": w, "bias": b, "scale": s, "shift": sh}, name)

    inputs = tuple(kw[k].clone().requires_grad_() for k in ("x",) + PARAMS)
    tol = FD_TOL if name == "reference" else dict(eps=1e-3, atol=2e-3, rtol=2e-3, fast_mode=True)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, **tol)


@pytest.mark.parametrize("act", [None, "silu"])
def test_jvp_finite_differences(backend, act):
    """The JVP (torch.func.jvp of the public function, all five tangents) vs a float64 central
    difference of the reference."""
    name, device = backend
    kw = make_case(2, 6, 3, (4, 3), act=act, seed=23)
    gen = torch.Generator().manual_seed(2)
    names = ("x",) + PARAMS
    tangents = [torch.randn(kw[k].shape, generator=gen) for k in names]
    k64 = _cast(kw, torch.float64)
    eps = 1e-6

    def h(e):
        return _ref({**k64, **{k: k64[k] + e * t.double() for k, t in zip(names, tangents)}})

    fd = (h(eps) - h(-eps)) / (2 * eps)
    kd = _to(device, kw)
    _, out = torch.func.jvp(lambda *p: _call({**kd, **dict(zip(names, p))}, name), tuple(kd[k] for k in names),
                            tuple(t.to(device) for t in tangents))
    _, torch32 = torch.func.jvp(lambda *p: _ref({**kw, **dict(zip(names, p))}), tuple(kw[k] for k in names),
                                tuple(tangents))
    assert_rule(out.cpu(), fd, torch32, torch.float32, what=f"{name} jvp vs FD")


def test_jvp_partial_tangents(backend):
    """Tangents on a subset of the inputs (only x; only scale and shift: the time-embedding path)."""
    name, device = backend
    kw = _to(device, make_case(2, 6, 2, (5,), seed=29))
    gen = torch.Generator().manual_seed(3)
    for which in (("x",), ("scale", "shift"), ("weight",)):
        tans = tuple(torch.randn(kw[k].shape, generator=gen).to(device) for k in which)
        _, out = torch.func.jvp(lambda *p: _call({**kw, **dict(zip(which, p))}, name), tuple(kw[k] for k in which),
                                tans)
        k64 = _cast(_to("cpu", kw), torch.float64)
        _, r64 = torch.func.jvp(lambda *p: _ref({**k64, **dict(zip(which, p))}), tuple(k64[k] for k in which),
                                tuple(t.double().cpu() for t in tans))
        kcpu = _to("cpu", kw)
        _, r32 = torch.func.jvp(lambda *p: _ref({**kcpu, **dict(zip(which, p))}), tuple(kcpu[k] for k in which),
                                tuple(t.cpu() for t in tans))
        assert_rule(out.cpu(), r64, r32, torch.float32, what=f"{name} jvp {which}")


def test_forward_ad_dual_tensors(backend):
    """torch.autograd.forward_ad gives the same tangent as torch.func.jvp."""
    import torch.autograd.forward_ad as fwAD

    name, device = backend
    kw = _to(device, make_case(2, 4, 2, (3, 3), seed=31))
    xd, sd = torch.randn_like(kw["x"]), torch.randn_like(kw["scale"])
    with fwAD.dual_level():
        out = _call({**kw, "x": fwAD.make_dual(kw["x"], xd), "scale": fwAD.make_dual(kw["scale"], sd)}, name)
        tangent = fwAD.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda x, s: _call({**kw, "x": x, "scale": s}, name), (kw["x"], kw["scale"]), (xd, sd))
    # the kernels run the same jvp either way; PyTorch's own formulas (reference) may round differently
    tol = dict(rtol=1e-6, atol=1e-6) if name == "reference" else dict(rtol=0, atol=0)
    torch.testing.assert_close(tangent, ref, **tol)


def test_jvp_channels_last(kernel_backend):
    """torch.func.jvp works on channels_last inputs (in torch 2.13 it fails for F.group_norm) and the
    tangent keeps the layout."""
    name, device = kernel_backend
    kw = _to(device, make_case(2, 8, 4, (5, 6), layout="channels_last", seed=37))
    xd = torch.randn_like(kw["x"])
    try:  # the torch limitation this op removes (may be fixed in a later torch)
        torch.func.jvp(lambda x: F.group_norm(x, 4), (kw["x"].cpu(),), (xd.cpu(),))
    except RuntimeError as e:
        assert "view size is not compatible" in str(e)
    y, yd = torch.func.jvp(lambda x: _call({**kw, "x": x}, name), (kw["x"],), (xd,))
    assert yd.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous(memory_format=torch.channels_last)
    k64 = _cast(_to("cpu", kw), torch.float64)
    _, r64 = torch.func.jvp(lambda x: _ref({**k64, "x": x}), (k64["x"],), (xd.double().cpu(),))
    kcpu = _to("cpu", kw)
    _, r32 = torch.func.jvp(lambda x: _ref({**kcpu, "x": x}), (kcpu["x"],), (xd.cpu(),))
    assert_rule(yd.cpu(), r64, r32, torch.float32, what=f"{name} channels_last jvp")


def test_jvp_inside_model(backend):
    """torch.func.jvp and a backward through conv -> group_norm -> conv, against the reference backend."""
    name, device = backend
    torch.manual_seed(41)
    conv1, conv2 = torch.nn.Conv2d(3, 8, 3, padding=1).double(), torch.nn.Conv2d(8, 3, 1).double()
    emb = torch.randn(2, 16, dtype=torch.float64)
    lin = torch.nn.Linear(16, 16).double()

    def model(x, be):
        s, b = lin(emb).chunk(2, dim=1)
        h = group_norm(conv1(x).float().to(device), 4, scale=(1 + s).float().to(device), shift=b.float().to(device),
                       activation="silu", backend=be)
        return conv2(h.cpu().double())

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xd = torch.randn_like(x)
    y, yd = torch.func.jvp(lambda a: model(a, name), (x,), (xd,))
    y0, yd0 = torch.func.jvp(lambda a: model(a, "reference"), (x,), (xd,))
    torch.testing.assert_close(yd, yd0, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(model(x, name).sum(), conv1.weight)[0]
    g0 = torch.autograd.grad(model(x, "reference").sum(), conv1.weight)[0]
    torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Layouts, determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,ndim", [("contig", 4), ("channels_last", 4), ("channels_last", 5),
                                         ("channels_last", 3), ("slice", 4)])
def test_layouts_without_copies(layout, ndim):
    """Contiguous, channels_last (1-3 spatial dims) and batch-sliced inputs reach the kernels as
    (N, C, S) views of the same memory; the gradient comes back in x's layout."""
    spatial = {3: (7,), 4: (3, 4), 5: (2, 3, 2)}[ndim]
    x = make_case(2, 6, 3, spatial, layout=layout, seed=43)["x"]
    assert gn_function.dense(x) is x
    v = gn_function.ncs_view(x)
    assert v.data_ptr() == x.data_ptr() and v.shape == (2, 6, math.prod(spatial))
    torch.testing.assert_close(v.reshape(x.shape), x, rtol=0, atol=0)
    odd = x.transpose(-1, -2) if ndim > 3 else x[:, :, ::2]
    if gn_function.layout_of(odd) is None:  # other strides: one copy
        assert gn_function.dense(odd) is not odd and gn_function.dense(odd).is_contiguous()


def test_deterministic(kernel_backend, split_groups):
    """Repeated forward, backward and JVP are bitwise equal (fixed reduction orders, no atomics)."""
    name, device = kernel_backend
    kw = _to(device, make_case(1, 8, 2, (40, 50), seed=47))
    outs = []
    for _ in range(2):
        leaves = {k: kw[k].clone().requires_grad_() for k in ("x",) + PARAMS}
        y = _call({**kw, **leaves}, name)
        grads = torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))
        _, jd = torch.func.jvp(lambda a: _call({**kw, "x": a}, name), (kw["x"],), (torch.ones_like(kw["x"]),))
        outs.append((y.detach(), *grads, jd))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


@pytest.mark.cpu
@pytest.mark.skipif(not _has_ext, reason="scm_kernels._C not built")
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 0.0), (torch.float32, 100.0), (torch.float16, 0.0),
                                          (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("N,C,G,spatial", [(2, 6, 2, (61, 97)), (3, 64, 8, (4, 4)), (2, 16, 4, (7,))])
def test_cpu_statistics_blocks_across_channels(dtype, offset, N, C, G, spatial):
    """The CPU statistics passes (forward moments, the JVP's sums) take a channels-first group's
    contiguous run in blocks of up to 8192 elements across channel boundaries: 3 channels of 5917
    positions = 17751 elements per group (two full blocks and a tail, merged), groups of 8 channels of
    16 positions and of 4 channels of 7 (one block each, tails inside; their output passes of the
    forward and of dx also take the group as one block with per-element coefficients). y, the
    gradients and the JVP against the float64 oracle (2x rule), mean and rstd against float64
    statistics of the same values."""
    kw = make_case(N, C, G, spatial, dtype=dtype, pdtype=torch.float32, offset=offset, seed=C + len(spatial))
    check_against_reference("cpu", torch.device("cpu"), kw, what=f"cpu {N},{C},{G},{spatial},{dtype},{offset}")
    x = kw["x"]
    _, mean, rstd = torch.ops.scm.group_norm(x.reshape(N, C, -1), None, None, None, None, G, 1e-5, False)
    xg = x.double().reshape(N, G, -1)
    mu64, var64 = xg.mean(-1), xg.var(-1, unbiased=False)
    # fp32 statistics: the mean within a few ulp of its magnitude plus sigma (block sums), rstd relative
    torch.testing.assert_close(mean.double(), mu64, rtol=4e-7, atol=float(var64.sqrt().max()) * 1e-6)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var64 + 1e-5), rtol=1e-5, atol=0)


@pytest.mark.cpu
@pytest.mark.skipif(not _has_ext, reason="scm_kernels._C not built")
@pytest.mark.parametrize("shape,layout", [((2, 8, 2, (16, 16)), "contig"), ((1, 4, 1, (96, 96)), "contig"),
                                          ((3, 24, 8, (29, 31)), "channels_last")])
def test_cpu_independent_of_thread_count(shape, layout):
    """The CPU split depends on the shape only: results do not depend on the number of threads."""
    N, C, G, spatial = shape
    kw = make_case(N, C, G, spatial, dtype=torch.bfloat16, pdtype=torch.float32, seed=53, layout=layout)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, max(2, before)):
            torch.set_num_threads(n)
            leaves = {k: kw[k].clone().requires_grad_() for k in ("x",) + PARAMS}
            y = _call({**kw, **leaves}, "cpu")
            res.append((y.detach(), *torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*res))


@pytest.mark.cpu
@pytest.mark.skipif(not _has_ext, reason="scm_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,C,G,spatial,layout", [(3, 64, 8, (13, 7), "contig"), (2, 32, 32, (1029,), "contig"),
                                                  (1, 4, 1, (70, 75), "contig"), (2, 16, 1, (5, 7), "channels_last"),
                                                  (1, 8, 2, (1,), "contig"), (1, 8, 2, (64, 130), "contig"),
                                                  (1, 16, 1, (64, 70), "channels_last")])
@pytest.mark.parametrize("silu", [True, False])
def test_cpu_half_inputs_match_fp32_path(dtype, N, C, G, spatial, layout, silu):
    """CPU, fp16/bf16 operands: forward, JVP and backward read and write the half-precision tensors
    in registers (AVX-512; on AVX2 the forward's statistics and SiLU) or through fp32 buffers
    (elsewhere); either way the results equal those of
    the same values in fp32, rounded once: mean, rstd and the backward's per-channel sums bit for bit,
    y, y_dot and dx after one rounding to the half dtype. Shapes with block tails, groups split over
    several tasks (the JVP's split sums, the backward's dx without cached da), one group of all
    channels in channels_last, and one element per channel."""
    gen = torch.Generator().manual_seed(7)

    def make(scale, offset, special=()):
        t = (torch.randn(N, C, *spatial, generator=gen) * scale + offset).to(dtype)
        t.view(-1)[:len(special)] = torch.tensor(special).to(dtype)
        t = t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t
        return t.reshape(N, C, -1) if layout != "channels_last" else t.permute(0, 2, 3, 1).reshape(N, -1, C).transpose(1, 2)

    x3, xd3, dy3 = make(3, 2, special=(1e4, -1e4, 60.0, -60.0)), make(1, 0), make(1, 0)
    w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    s, sh = torch.randn(N, C, generator=gen), torch.randn(N, C, generator=gen)
    tangents = [torch.randn(C, generator=gen), torch.randn(C, generator=gen), torch.randn(N, C, generator=gen),
                torch.randn(N, C, generator=gen)]

    def once(t):  # an fp32 result rounded to the half dtype, compared as fp32
        return t.to(dtype).float()

    got = torch.ops.scm.group_norm(x3, w, b, s, sh, G, 1e-5, silu)
    want = torch.ops.scm.group_norm(x3.float(), w, b, s, sh, G, 1e-5, silu)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.equal(got[0].float(), once(want[0]))
    assert torch.isfinite(got[0]).all()
    mean, rstd = want[1], want[2]
    for xd in (xd3, None):
        got_d = torch.ops.scm.group_norm_jvp(x3, xd, w, b, s, sh, *tangents, mean, rstd, G, silu)
        want_d = torch.ops.scm.group_norm_jvp(x3.float(), None if xd is None else xd.float(), w, b, s, sh, *tangents,
                                              mean, rstd, G, silu)
        assert torch.equal(got_d.float(), once(want_d))
        assert torch.isfinite(got_d).all()
    got_b = torch.ops.scm.group_norm_backward(dy3, x3, w, b, s, sh, mean, rstd, G, silu)
    want_b = torch.ops.scm.group_norm_backward(dy3.float(), x3.float(), w, b, s, sh, mean, rstd, G, silu)
    assert torch.equal(got_b[1], want_b[1]) and torch.equal(got_b[2], want_b[2])
    assert torch.equal(got_b[0].float(), once(want_b[0]))
    assert torch.isfinite(got_b[0]).all()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors(monkeypatch):
    """Every bad input raises TypeError/ValueError naming the argument, before any kernel runs."""
    def kernel_ran(*a):
        raise AssertionError("a kernel ran before the argument check")

    for name in list(gn_function.LAUNCH):
        for table in (gn_function.LAUNCH, gn_function.JVP, gn_function.BACKWARD):
            monkeypatch.setitem(table, name, kernel_ran)

    x = torch.randn(2, 6, 4, 4)
    ok = dict(num_groups=3)

    def call(x=x, **over):
        a = {**ok, **over}
        return group_norm(x, a.pop("num_groups"), **a)

    cases = [
        (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(x=torch.ones(2, 6, 4, dtype=torch.int64)), TypeError, r"x must have dtype in .*got torch.int64"),
        (dict(x=torch.randn(2, 6)), ValueError, r"x must have shape \(N, C, \*spatial\) with 1 to 3 spatial dims, "
                                                r"got shape \(2, 6\)"),
        (dict(x=torch.randn(1, 2, 2, 2, 2, 2)), ValueError, r"x must have shape .*1 to 3 spatial dims, got shape \(1, 2, 2, 2, 2, 2\)"),
        (dict(x=torch.randn(2, 6, 0, 4)), ValueError, r"x must not be empty .*got shape \(2, 6, 0, 4\)"),
        (dict(x=torch.randn(0, 6, 4)), ValueError, r"x must not be empty"),
        (dict(num_groups=4), ValueError, r"num_groups must divide the channels C = 6, got num_groups = 4"),
        (dict(num_groups=0), ValueError, r"num_groups must be >= 1, got 0"),
        (dict(num_groups=2.0), TypeError, r"num_groups must be an int, got float"),
        (dict(eps=0.0), ValueError, r"eps must be > 0, got 0.0"),
        (dict(eps="1e-5"), TypeError, r"eps must be a real number, got str"),
        (dict(activation="gelu"), ValueError, r"activation must be one of \(None, 'silu'\), got 'gelu'"),
        (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(6,\), got \(5,\)"),
        (dict(weight=torch.ones(6, 1)), ValueError, r"weight must have shape \(6,\), got \(6, 1\)"),
        (dict(weight=torch.ones(6, dtype=torch.float16)), TypeError,
         r"weight must have x's dtype \(torch.float32\) or torch.float32, got torch.float16"),
        (dict(weight=torch.ones(6, dtype=torch.int32)), TypeError, r"weight must have dtype in"),
        (dict(weight=torch.ones(6, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
        (dict(weight=[1.0] * 6), TypeError, r"weight must be a torch.Tensor, got list"),
        (dict(bias=torch.ones(7)), ValueError, r"bias must have shape \(6,\), got \(7,\)"),
        (dict(bias=torch.ones(6, dtype=torch.bfloat16)), TypeError, r"bias must have x's dtype"),
        (dict(scale=torch.ones(6)), ValueError, r"scale must have shape \(2, 6\) or \(2, 6, 1, ...\), got \(6,\)"),
        (dict(scale=torch.ones(2, 6, 4, 4)), ValueError, r"scale must have shape \(2, 6\) or .*got \(2, 6, 4, 4\)"),
        (dict(scale=torch.ones(1, 6)), ValueError, r"scale must have shape \(2, 6\)"),
        (dict(scale=torch.ones(2, 6, dtype=torch.float64)), TypeError, r"scale must have x's dtype"),
        (dict(shift=torch.ones(2, 5)), ValueError, r"shift must have shape \(2, 6\)"),
        (dict(shift=torch.ones(2, 6, device="meta")), ValueError, r"shift is on meta but x is on cpu"),
        (dict(shift=torch.empty(2, 0)), ValueError, r"shift must not be empty"),
        (dict(backend="gpu"), ValueError, r"backend: expected one of"),
        (dict(backend="cuda"), ValueError, r"backend 'cuda' needs CUDA tensors, got tensors on cpu"),
    ]
    for over, exc, match in cases:
        with pytest.raises(exc, match=match if match.startswith("backend:") else "scm_kernels.group_norm: " + match):
            call(**over)
    # accepted: (N, C, 1, 1) modulation, float32 parameters with a bf16 x
    xb = x.bfloat16()
    out = group_norm(xb, 3, torch.ones(6), None, scale=torch.ones(2, 6, 1, 1), shift=torch.zeros(2, 6, 1, 1),
                     backend="reference")
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Operator registration, torch.compile, AOT specs
# ---------------------------------------------------------------------------------------------
def _schema_args(kw):
    x3 = gn_function.ncs_view(kw["x"])
    f32 = {k: kw[k].float() if kw[k] is not None else None for k in PARAMS}
    return x3, f32


@pytest.mark.parametrize("ns", ["scm", "scm_triton"])
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_opcheck(ns, layout):
    """torch.library.opcheck (schema, fake tensors, autograd registration, dispatch) of the ops."""
    if ns == "scm" and not (_has_ext and hasattr(torch.ops.scm, "group_norm")):
        pytest.skip("scm_kernels._C not built")
    if ns == "scm_triton" and not _interp:
        pytest.skip("needs the Triton interpreter on CPU tensors")
    if ns == "scm_triton" and layout == "contig":
        pytest.skip("the interpreter is slow: one layout for the Triton ops")
    if ns == "scm_triton":
        from scm_kernels.group_norm import triton_kernels  # noqa: F401
    ops = getattr(torch.ops, ns)
    kw = make_case(2, 6, 3, (3, 4), layout=layout, seed=59)
    x3, p = _schema_args(kw)
    y, mean, rstd = ops.group_norm(x3, p["weight"], p["bias"], p["scale"], p["shift"], 3, 1e-5, True)
    assert y.stride() == gn_function.empty_ncs(x3).stride()
    dy = torch.randn_like(y)
    for op, args in [
        (ops.group_norm.default, (x3, p["weight"], p["bias"], p["scale"], p["shift"], 3, 1e-5, True)),
        (ops.group_norm.default, (x3, None, None, None, None, 3, 1e-5, False)),
        (ops.group_norm_jvp.default, (x3, torch.randn_like(y), p["weight"], p["bias"], p["scale"], p["shift"],
                                      torch.randn(6), None, torch.randn(2, 6), None, mean, rstd, 3, True)),
        (ops.group_norm_jvp.default, (x3, None, None, None, None, None, None, torch.randn(6), None, None, mean, rstd,
                                      3, False)),
        (ops.group_norm_backward.default, (dy, x3, p["weight"], p["bias"], p["scale"], p["shift"], mean, rstd, 3,
                                           True)),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.cpu
@pytest.mark.skipif(not _has_ext, reason="scm_kernels._C not built")
def test_compiles():
    """torch.compile (aot_eager, fullgraph) traces group_norm through its fake kernels: the compiled
    forward and gradients equal eager exactly."""
    kw = make_case(2, 8, 4, (3, 5), layout="channels_last", seed=61)
    leaves = [kw[k].clone().requires_grad_() for k in ("x",) + PARAMS]

    def fn(x, w, b, s, sh):
        return group_norm(x, 4, w, b, scale=s, shift=sh, activation="silu", backend="cpu")

    torch._dynamo.reset()
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        y = f(*leaves)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum(), leaves)
        outs.append((y.detach(), g))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.static
def test_aot_specs_cover_launchers():
    """AOT_SPECS name every argument of its kernel and cover every dtype x layout x tile the
    launchers can pick, for the three kernels."""
    if not _backend.triton_available():
        pytest.skip("needs triton")
    from scm_kernels.group_norm import triton_kernels as tk

    specs = tk.AOT_SPECS
    for s in specs:
        assert list(s.signature) == list(s.fn.arg_names), s.kernel_name
        if s.constexprs.get("MODE") != 3:
            assert s.num_warps == tk.NUM_WARPS
    for dtype, tt in tk._TT.items():  # mode 3: every (tile, warps) resident_tile can return
        for cl in (False, True):
            for total, warps in tk.RESIDENT_TILES:
                for bc in (1, 2, 4, 8, 16, 32, 64):
                    want = {"CL": cl, "BC": bc, "BS": total // bc, "MODE": 3}
                    got = [s for s in specs if s.kernel_name == "_gn_fwd_kernel" and s.signature["X"] == tt
                           and s.constexprs == want and s.num_warps == warps]
                    assert len(got) == (bc <= tk.RESIDENT_MAX_BC and dtype != torch.float64), (tt, want)
    for kernel, modes in (("_gn_fwd_kernel", (0, 1, 2)), ("_gn_jvp_kernel", (None,)), ("_gn_bwd_kernel", (None,))):
        for tt in tk._TT.values():
            for cl in (False, True):
                for bc, bs in tk.configs(cl):
                    for mode in modes:
                        want = {"CL": cl, "BC": bc, "BS": bs, **({"MODE": mode} if mode is not None else {})}
                        got = [s for s in specs if s.kernel_name == kernel and s.signature["X"] == tt
                               and s.constexprs == want]
                        assert len(got) == 1, (kernel, tt, want)
    for Cg, S in [(1, 1), (4, 1024), (8, 1024), (32, 16), (16, 4096), (3, 7)]:
        assert tk.config(Cg, S) in tk.CONFIGS
        assert tk.config(Cg, S, True) in tk.configs(True)
    # channels_last: the narrowest tile that covers the group's channels (one pass over each sector)
    assert [tk.config(Cg, 4096, True)[0] for Cg in (1, 2, 3, 4, 8, 12, 16, 24, 32, 64)] == \
        [2, 2, 4, 4, 8, 16, 16, 32, 32, 32]


# ---------------------------------------------------------------------------------------------
# scm_kernels.nn.AdaptiveGroupNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["adagn", "double"])
def test_adaptive_group_norm(backend, mode):
    """The module (projection + pixel norm + fused group_norm) on every backend against the same
    module in float64 on the reference backend: output, gradients of x, emb and every parameter,
    and torch.func.jvp w.r.t. (x, emb)."""
    from scm_kernels.nn import AdaptiveGroupNorm

    name, device = backend
    torch.manual_seed(67)
    m = AdaptiveGroupNorm(8, 12, num_groups=4, mode=mode, backend=name)
    with torch.no_grad():  # non-trivial modulation and affine parameters
        m.proj.weight.normal_(0, 0.3)
        m.proj.bias.normal_(0, 0.3)
        m.weight.normal_(1, 0.2)
        m.bias.normal_(0, 0.2)
    m64 = AdaptiveGroupNorm(8, 12, num_groups=4, mode=mode, backend="reference").double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    m32 = AdaptiveGroupNorm(8, 12, num_groups=4, mode=mode, backend="reference")
    m32.load_state_dict(m.state_dict())
    m.to(device)
    x = torch.randn(3, 8, 4, 5).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(3, 12)
    dy = torch.randn(x.shape, dtype=torch.float64)
    xd, ed = torch.randn_like(x), torch.randn_like(emb)

    def run(mod, dtype, dev):
        xs = x.to(dtype=dtype, device=dev).requires_grad_()
        es = emb.to(dtype=dtype, device=dev).requires_grad_()
        y = mod(xs, es)
        params = list(mod.parameters())
        grads = torch.autograd.grad(y, [xs, es] + params, dy.to(dtype=y.dtype, device=dev))
        _, jvp = torch.func.jvp(lambda a, b: mod(a, b), (xs.detach(), es.detach()),
                                (xd.to(dtype=dtype, device=dev), ed.to(dtype=dtype, device=dev)))
        return [y.detach().cpu(), *(g.cpu() for g in grads), jvp.cpu()]

    k, r64, r32 = run(m, torch.float32, device), run(m64, torch.float64, "cpu"), run(m32, torch.float32, "cpu")
    labels = ["y", "dx", "demb"] + [n for n, _ in m.named_parameters()] + ["jvp"]
    for a, b, c, label in zip(k, r64, r32, labels):
        assert_rule(a, b, c, torch.float32, what=f"{name} {mode} {label}")
    assert "mode='" + mode in repr(m)
