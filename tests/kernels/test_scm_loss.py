"""Tests of scm_kernels.scm_loss (A14-A17): every backend against the float64 reference (the 2x-PyTorch
rule of tests/conftest.py), gradients w.r.t. F and logvar against autograd of the reference and
gradcheck, the JVP against torch.func.jvp of the reference and float64 central differences, layouts
(batch slices, channels_last, broadcast), mixed dtypes, determinism, argument errors, opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scm_kernels import backend as _backend
from scm_kernels.scm_loss import function as loss_function
from scm_kernels.scm_loss import reference, scm_loss, triton_kernels
from tests.conftest import DTYPES, FD_TOL, assert_rule, max_err

ref_loss = reference.scm_loss


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _make(shape, dtype, layout, gen, scale=1.0):
    """A tensor of `shape` and `dtype` with the given memory layout."""
    B, inner = shape[0], shape[1:]
    if layout == "slice":  # every other sample of a bigger batch
        x = torch.randn((2 * B,) + inner, generator=gen, dtype=torch.float64)[::2]
    elif layout == "expanded":  # one sample broadcast over the batch (row stride 0)
        x = torch.randn((1,) + inner, generator=gen, dtype=torch.float64).expand(shape)
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = (x * scale).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_case(B, inner, dtype, data_dtype=None, layout="contig", has_fm=True, lv="B1", lv_dtype=None,
              t_kind="vec", r=1.0, c=0.1, sigma_d=0.5, seed=0):
    """Keyword arguments of one scm_loss call (without backend). Layouts: contig, slice (every
    tensor a batch slice), channels_last (every tensor), expanded (x_t and dxt_dt broadcast over
    the batch, t a number), mixed (F contiguous, the others channels_last or sliced: copies)."""
    gen = torch.Generator().manual_seed(seed)
    data_dtype = data_dtype or dtype
    shape = (B,) + tuple(inner)
    lay = {k: layout for k in ("F", "J", "x", "dx", "Fm")}
    if layout == "expanded":
        lay.update(F="contig", J="contig", Fm="slice")
    if layout == "mixed":
        lay.update(F="contig", J="channels_last" if len(inner) == 3 else "slice", x="slice", dx="contig",
                   Fm="slice")
    kw = dict(
        F=_make(shape, dtype, lay["F"], gen),
        jvp_out=_make(shape, dtype, lay["J"], gen),
        x_t=_make(shape, data_dtype, lay["x"], gen),
        dxt_dt=_make(shape, data_dtype, lay["dx"], gen),
        F_minus=_make(shape, dtype, lay["Fm"], gen, scale=1.0) if has_fm else None,
        r=r, c=c, sigma_d=sigma_d,
    )
    # times exactly representable in the low dtype, so that every path sees the same values
    t = (0.05 + 1.5 * torch.rand(B, generator=gen, dtype=torch.float64)).to(dtype).float()
    if t_kind == "number" or layout == "expanded":
        kw["t"] = float(t[0])
    elif t_kind == "B111":
        kw["t"] = t.reshape((B,) + (1,) * len(inner))
    else:
        kw["t"] = t
    if lv is not None:
        v = (0.5 * torch.randn(B, generator=gen, dtype=torch.float64)).to(lv_dtype or dtype)
        kw["logvar"] = v.reshape(B, 1) if lv == "B1" else v
    else:
        kw["logvar"] = None
    return kw


def _cast(kw, dtype):
    """The same call with every tensor (and t) in `dtype` (the float64 oracle, or PyTorch in lowp)."""
    out = dict(kw)
    for k in ("F", "jvp_out", "x_t", "dxt_dt", "F_minus", "logvar", "t"):
        if isinstance(out.get(k), torch.Tensor):
            out[k] = out[k].to(dtype)
    return out


def _ref(kw):
    return ref_loss(kw["F"], kw["jvp_out"], kw["x_t"], kw["dxt_dt"], kw["t"], kw["logvar"], kw["F_minus"],
                    kw["sigma_d"], kw["r"], kw["c"])


def _lowp_ref_kw(kw):
    """What eager PyTorch computes for the user: the reference on the given tensors, t in F's dtype."""
    out = dict(kw)
    if isinstance(kw["t"], torch.Tensor):
        out["t"] = kw["t"].to(kw["F"].dtype)
    return out


def _to(device, kw):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _call(kw, name):
    kw = dict(kw)
    return scm_loss(kw.pop("F"), kw.pop("jvp_out"), kw.pop("x_t"), kw.pop("dxt_dt"), kw.pop("t"),
                    kw.pop("logvar"), backend=name, **kw)


def _loss_grads_jvp(fn, kw, gw, F_dot, lv_dot):
    """loss, dF, dlogvar (for the upstream gradient gw) and the JVP along (F_dot, lv_dot)."""
    F = kw["F"].detach().clone().requires_grad_()
    lv = kw["logvar"].detach().clone().requires_grad_() if kw["logvar"] is not None else None
    loss = fn({**kw, "F": F, "logvar": lv})
    (loss.to(gw.dtype) * gw).sum().backward()
    primals = (kw["F"],) + ((kw["logvar"],) if lv is not None else ())
    tangents = (F_dot,) + ((lv_dot,) if lv is not None else ())

    def f(*p):
        return fn({**kw, "F": p[0], "logvar": p[1] if len(p) > 1 else None})

    _, jvp = torch.func.jvp(f, primals, tangents)
    return loss.detach(), F.grad, (lv.grad if lv is not None else None), jvp


def check_against_reference(name, device, kw, what=""):
    """Kernel backend `name` vs the float64 reference and PyTorch's own low-precision result:
    loss, the gradients w.r.t. F and logvar, and the JVP (tolerance rule of tests/conftest.py)."""
    dtype = kw["F"].dtype
    kw = _to(device, kw)
    gen = torch.Generator().manual_seed(1)
    B = kw["F"].shape[0]
    gw = torch.randn(B, generator=gen, dtype=torch.float64).to(device)
    F_dot = torch.randn(kw["F"].shape, generator=gen, dtype=torch.float64).to(device)
    lv_dot = torch.randn(kw["logvar"].shape, generator=gen, dtype=torch.float64).to(device) \
        if kw["logvar"] is not None else None

    k = _loss_grads_jvp(lambda a: _call(a, name), kw, gw.float(), F_dot.to(dtype),
                        lv_dot.to(kw["logvar"].dtype) if lv_dot is not None else None)
    r64 = _loss_grads_jvp(_ref, _cast(kw, torch.float64), gw, F_dot, lv_dot)
    lw = _lowp_ref_kw(kw)
    rlp = _loss_grads_jvp(_ref, lw, gw.to(torch.result_type(lw["F"], lw["x_t"])), F_dot.to(dtype),
                          lv_dot.to(kw["logvar"].dtype) if lv_dot is not None else None)

    assert k[0].dtype == torch.float32 and k[0].shape == (B,)
    assert k[1].dtype == kw["F"].dtype and k[1].shape == kw["F"].shape
    for i, label in enumerate(("loss", "dL/dF", "dL/dlogvar", "jvp")):
        if k[i] is None:
            assert r64[i] is None
            continue
        assert_rule(k[i], r64[i], rlp[i], dtype, what=f"{what} {label}")
    if kw["logvar"] is not None:
        assert k[2].dtype == kw["logvar"].dtype and k[2].shape == kw["logvar"].shape


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.reference
def test_reference_matches_scalar_formulas():
    """The reference against a per-element loop over (A14)-(A17) with Python floats."""
    kw = _cast(make_case(3, (2, 5), torch.float64, lv="B", r=0.7, c=0.3, sigma_d=0.8, seed=3), torch.float64)
    out = _ref(kw)
    for b in range(3):
        t = float(kw["t"][b])
        ct, st = math.cos(t), math.sin(t)
        F, J, x, dx, Fm = (kw[k][b].reshape(-1).tolist() for k in ("F", "jvp_out", "x_t", "dxt_dt", "F_minus"))
        g = [-ct * ct * (0.8 * Fm[i] - dx[i]) - 0.7 * (ct * st * x[i] + 0.8 * J[i]) for i in range(10)]
        n = math.sqrt(sum(v * v for v in g))
        sq = sum((F[i] - Fm[i] - g[i] / (n + 0.3)) ** 2 for i in range(10))
        lv = float(kw["logvar"][b])
        assert abs(float(out[b]) - (math.exp(-lv) / 10 * sq + lv)) < 1e-12


@pytest.mark.reference
def test_reference_gradient_is_scm_limit():
    """(sec. 7) With r = 1, no normalization and no weight, grad_F ||F - F^- - g||^2 equals the
    dt -> 0 limit of the discrete consistency loss gradient, (1/dt)(1/(sigma_d tan t)) grad ||f(x_t, t)
    - f^-(x_{t-dt}, t-dt)||^2, for sCT on one path (x0, z), with F linear in its inputs."""
    torch.manual_seed(0)
    sd, t, D = 0.5, 0.9, 6
    W = torch.randn(D, D, dtype=torch.float64) * 0.3
    a = torch.randn(D, dtype=torch.float64) * 0.4
    x0, z = torch.randn(D, dtype=torch.float64), sd * torch.randn(D, dtype=torch.float64)

    def Fnet(W, x, s):  # a network F(x/sd, s), linear in W (x/sd inside: the tangent of x is d x_t)
        return (x / sd) @ W.T + a * s

    def xt(s):  # (A1)
        return math.cos(s) * x0 + math.sin(s) * z

    def f(W, s):  # (A5)
        return math.cos(s) * xt(s) - math.sin(s) * sd * Fnet(W, xt(s), s)

    dxdt = -math.sin(t) * x0 + math.cos(t) * z  # (A12, sCT)
    F_minus, J = torch.func.jvp(lambda x, s: Fnet(W, x, s), (xt(t), torch.tensor(t, dtype=torch.float64)),
                                (math.cos(t) * math.sin(t) * dxdt, torch.tensor(math.cos(t) * math.sin(t),
                                                                                       dtype=torch.float64)))
    Wr = W.clone().requires_grad_()
    Fw = Fnet(Wr, xt(t), t)[None]
    # c huge: g^ -> g / c; multiply back by c to remove the normalization
    c = 1e12
    L = ref_loss(Fw, J[None], xt(t)[None], dxdt[None], t, None, F_minus[None], sd, 1.0, c)
    (L.sum() * D * c).backward()  # grad of -2 g . F  ~ grad of c * ||F - F^- - g/c||^2 up to O(1/c)
    g_cont = Wr.grad.clone()
    dt = 1e-6
    Wd = W.clone().requires_grad_()
    disc = ((f(Wd, t) - f(W, t - dt)) ** 2).sum() / dt / (sd * math.tan(t))
    disc.backward()
    torch.testing.assert_close(g_cont, Wd.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.reference
def test_reference_gradcheck_float64():
    """gradcheck (backward and forward AD) needs F_minus held fixed: with the default F_minus =
    F.detach() a finite difference would move F^- too, which the stop-gradient excludes by
    definition. The default is checked to give the gradient and tangent of F_minus = F held fixed."""
    kw = _cast(make_case(2, (3, 2), torch.float64, seed=5), torch.float64)

    def f(F, lv, fm=kw["F_minus"]):
        return ref_loss(F, kw["jvp_out"], kw["x_t"], kw["dxt_dt"], kw["t"], lv, fm, 0.5, 1.0, 0.1)

    F = kw["F"].clone().requires_grad_()
    lv = kw["logvar"].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (F, lv), check_forward_ad=True, **FD_TOL)
    tangents = (torch.randn_like(F), torch.randn_like(lv))
    fixed = kw["F"].clone()
    g_def = torch.autograd.grad(f(F, lv, None).sum(), (F, lv))
    g_fix = torch.autograd.grad(f(F, lv, fixed).sum(), (F, lv))
    j_def = torch.func.jvp(lambda F, lv: f(F, lv, None), (kw["F"], kw["logvar"]), tangents)[1]
    j_fix = torch.func.jvp(lambda F, lv: f(F, lv, fixed), (kw["F"], kw["logvar"]), tangents)[1]
    assert all(torch.equal(a, b) for a, b in zip(g_def, g_fix)) and torch.equal(j_def, j_fix)


# ---------------------------------------------------------------------------------------------
# Every backend against the oracle
# ---------------------------------------------------------------------------------------------
INNERS = [(1,), (7,), (97,), (3, 5, 7), (4, 3, 3), (2, 7, 11)]


@st.composite
def cases(draw):
    inner = draw(st.sampled_from(INNERS))
    layouts = ["contig", "slice", "expanded", "mixed"] + (["channels_last"] if len(inner) == 3 else [])
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        B=draw(st.sampled_from([1, 2, 3, 7])), inner=inner, dtype=dtype,
        data_dtype=draw(st.sampled_from([dtype, torch.float32])),
        layout=draw(st.sampled_from(layouts)), has_fm=draw(st.booleans()),
        lv=draw(st.sampled_from([None, "B", "B1"])), lv_dtype=draw(st.sampled_from([dtype, torch.float32])),
        t_kind=draw(st.sampled_from(["vec", "number", "B111"])), r=draw(st.sampled_from([0.0, 0.5, 1.0])),
        c=draw(st.sampled_from([0.1, 1e-3, 2.0])), sigma_d=draw(st.sampled_from([0.5, 1.3])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=cases())
def test_matches_reference(kernel_backend, case):
    name, device = kernel_backend
    check_against_reference(name, device, make_case(**case), what=f"{name} {case}")


@pytest.mark.parametrize("B,inner", [(1, (3, 64, 64)), (2, (1000,)), (3, (1,)), (1, (97,)), (5, (2, 1, 13))])
@pytest.mark.parametrize("has_fm", [True, False])
def test_awkward_shapes(kernel_backend, B, inner, has_fm):
    """Single-element samples, samples of several D-blocks / CPU segments (3x64x64 > 8192), B = 1."""
    name, device = kernel_backend
    check_against_reference(name, device, make_case(B, inner, torch.float32, has_fm=has_fm, lv="B", seed=B),
                            what=f"{name} {B} {inner}")


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("c", [0.1, 1e-3])
@pytest.mark.parametrize("lv", [None, "B1"])
@pytest.mark.parametrize("has_fm", [True, False])
def test_options(kernel_backend, r, c, lv, has_fm):
    name, device = kernel_backend
    kw = make_case(3, (2, 3, 5), torch.float32, has_fm=has_fm, lv=lv, r=r, c=c, seed=7)
    check_against_reference(name, device, kw, what=f"{name} r={r} c={c} lv={lv} fm={has_fm}")


def test_reference_backend_matches_reference(backend):
    """The public function on every backend (the reference included) against the oracle in fp32."""
    name, device = backend
    kw = make_case(2, (3, 4, 5), torch.float32, layout="channels_last", seed=11)
    out = _call(_to(device, kw), name)
    r64 = _ref(_cast(kw, torch.float64))
    assert out.dtype == torch.float32
    assert_rule(out.cpu(), r64, _ref(kw), torch.float32)


# ---------------------------------------------------------------------------------------------
# Derivatives: gradcheck, finite differences, stop-gradient inputs, API
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lv", [None, "B1"])
def test_gradcheck(kernel_backend, lv):
    """gradcheck of backward and forward AD w.r.t. F and logvar on float64 inputs, F_minus given
    (see test_reference_gradcheck_float64; the default F_minus is covered by test_matches_reference
    against autograd of the reference). The kernels compute in fp32, so the differences use
    eps = 1e-3: the loss is quadratic in F (central differences exact up to rounding, ~1e-7 / 1e-3)
    and smooth in logvar (error eps^2 / 6)."""
    name, device = kernel_backend
    kw = _to(device, _cast(make_case(2, (3, 2), torch.float64, lv=lv, seed=9), torch.float64))

    def f(F, *lv):
        return _call({**kw, "F": F, "logvar": lv[0] if lv else None}, name)

    inputs = (kw["F"].clone().requires_grad_(),)
    if lv is not None:
        inputs += (kw["logvar"].clone().requires_grad_(),)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=1e-3, rtol=1e-3, check_forward_ad=True)


@pytest.mark.parametrize("has_fm", [True, False])
def test_jvp_finite_differences(backend, has_fm):
    """JVP (torch.func.jvp of the public function) vs a float64 central difference of the reference
    along (F_dot, logvar_dot), F_minus held at the primal F (the stop-gradient)."""
    name, device = backend
    kw = make_case(3, (2, 3, 5), torch.float32, has_fm=has_fm, lv="B1", r=0.5, seed=13)
    gen = torch.Generator().manual_seed(2)
    F_dot = torch.randn(kw["F"].shape, generator=gen)
    lv_dot = torch.randn(kw["logvar"].shape, generator=gen)
    k64 = _cast(kw, torch.float64)
    k64["F_minus"] = k64["F_minus"] if has_fm else k64["F"].clone()
    eps = 1e-5

    def h(s):
        return _ref({**k64, "F": k64["F"] + s * F_dot.double(), "logvar": k64["logvar"] + s * lv_dot.double()})

    fd = (h(eps) - h(-eps)) / (2 * eps)

    def f(F, lv, kw=kw, name=name):
        return _call({**_to(device, kw), "F": F, "logvar": lv}, name)

    _, out = torch.func.jvp(f, (kw["F"].to(device), kw["logvar"].to(device)), (F_dot.to(device), lv_dot.to(device)))
    _, torch32 = torch.func.jvp(lambda F, lv: _ref({**kw, "F": F, "logvar": lv}), (kw["F"], kw["logvar"]),
                                (F_dot, lv_dot))
    assert_rule(out.cpu(), fd, torch32, torch.float32, what=f"{name} jvp vs FD")
    if name == "reference":  # the oracle itself in float64
        _, j64 = torch.func.jvp(lambda F, lv: _ref({**k64, "F": F, "logvar": lv}), (k64["F"], k64["logvar"]),
                                (F_dot.double(), lv_dot.double()))
        torch.testing.assert_close(j64, fd, **FD_TOL)


def test_stop_gradient_inputs_and_grad_layouts(backend):
    """J, x_t, dxt_dt, F_minus, t get no gradient and no tangent; F's and logvar's gradients come
    back in their own dtype, shape (logvar (B, 1)) and F's layout (channels_last here)."""
    name, device = backend
    kw = _to(device, make_case(2, (3, 4, 5), torch.bfloat16, data_dtype=torch.float32, layout="channels_last",
                               lv="B1", seed=17))
    F = kw["F"].clone().requires_grad_()
    lv = kw["logvar"].clone().requires_grad_()
    others = {k: kw[k].clone().requires_grad_() for k in ("jvp_out", "x_t", "dxt_dt", "F_minus")}
    t = kw["t"].clone().requires_grad_()
    loss = _call({**kw, **others, "F": F, "logvar": lv, "t": t}, name)
    loss.sum().backward()
    assert F.grad.dtype == torch.bfloat16 and F.grad.shape == F.shape
    assert lv.grad.dtype == torch.bfloat16 and lv.grad.shape == (2, 1)
    assert all(v.grad is None for v in others.values()) and t.grad is None
    if name != "reference":
        assert F.grad.is_contiguous(memory_format=torch.channels_last)

    # tangents of the stop-gradient inputs do not change the output tangent
    def f(F, J, x):
        return _call({**kw, "F": F, "jvp_out": J, "x_t": x}, name)

    ones = [torch.ones_like(kw[k]) for k in ("F", "jvp_out", "x_t")]
    _, a = torch.func.jvp(f, (kw["F"], kw["jvp_out"], kw["x_t"]), tuple(ones))
    _, b = torch.func.jvp(f, (kw["F"], kw["jvp_out"], kw["x_t"]), (ones[0], ones[1] * 0, ones[2] * 0))
    assert torch.equal(a, b)


def test_forward_ad_dual_tensors(backend):
    """torch.autograd.forward_ad gives the same tangent as torch.func.jvp."""
    import torch.autograd.forward_ad as fwAD

    name, device = backend
    kw = _to(device, make_case(3, (7,), torch.float32, lv="B", seed=19))
    F_dot, lv_dot = torch.randn_like(kw["F"]), torch.randn_like(kw["logvar"])
    with fwAD.dual_level():
        out = _call({**kw, "F": fwAD.make_dual(kw["F"], F_dot), "logvar": fwAD.make_dual(kw["logvar"], lv_dot)}, name)
        tangent = fwAD.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda F, lv: _call({**kw, "F": F, "logvar": lv}, name), (kw["F"], kw["logvar"]),
                            (F_dot, lv_dot))
    torch.testing.assert_close(tangent, ref, rtol=0, atol=0)
    # a tangent on logvar alone: Ldot = (1 - exp(-logvar) / D * sqerr) * logvar_dot, vs the oracle
    with fwAD.dual_level():
        out = _call({**kw, "logvar": fwAD.make_dual(kw["logvar"], lv_dot)}, name)
        tangent = fwAD.unpack_dual(out).tangent
    k64 = _cast(kw, torch.float64)
    _, ref64 = torch.func.jvp(lambda lv: _ref({**k64, "logvar": lv}), (k64["logvar"],), (lv_dot.double(),))
    _, ref32 = torch.func.jvp(lambda lv: _ref({**kw, "logvar": lv}), (kw["logvar"],), (lv_dot,))
    assert_rule(tangent.cpu(), ref64.cpu(), ref32.cpu(), torch.float32, what="logvar-only tangent")


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
def test_deterministic(kernel_backend):
    """Repeated forward/backward are bitwise equal (no atomics, fixed reduction orders)."""
    name, device = kernel_backend
    kw = _to(device, make_case(2, (20000,), torch.float32, lv="B", seed=23))
    outs = []
    for _ in range(3):
        F = kw["F"].clone().requires_grad_()
        loss = _call({**kw, "F": F}, name)
        loss.sum().backward()
        outs.append((loss.detach(), F.grad))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


@pytest.mark.cpu
@pytest.mark.skipif(not _backend.extension_available(), reason="scm_kernels._C not built")
def test_cpu_independent_of_thread_count():
    """The CPU kernels split samples into fixed segments: the result does not depend on the threads."""
    kw = make_case(1, (30000,), torch.float16, data_dtype=torch.float32, lv="B", seed=29)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, max(2, before)):
            torch.set_num_threads(n)
            F = kw["F"].clone().requires_grad_()
            loss = _call({**kw, "F": F}, "cpu")
            loss.sum().backward()
            res.append((loss.detach(), F.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors(monkeypatch):
    """Every bad input raises TypeError/ValueError naming the argument, before any kernel runs."""
    def kernel_ran(*a):
        raise AssertionError("a kernel ran before the argument check")

    for table in (loss_function.LAUNCH, loss_function.BACKWARD, loss_function.JVP):
        for k in list(table):
            monkeypatch.setitem(table, k, kernel_ran)

    B = 2
    F = torch.randn(B, 3, 4)
    ok = dict(jvp_out=torch.randn(B, 3, 4), x_t=torch.randn(B, 3, 4), dxt_dt=torch.randn(B, 3, 4), t=0.5)

    def call(F=F, **over):
        a = {**ok, **over}
        return scm_loss(F, a.pop("jvp_out"), a.pop("x_t"), a.pop("dxt_dt"), a.pop("t"), **a)

    cases = [
        (dict(F=[1.0, 2.0]), TypeError, r"F must be a torch.Tensor, got list"),
        (dict(F=torch.ones(B, 3, dtype=torch.int64)), TypeError, r"F must have dtype in .*got torch.int64"),
        (dict(F=torch.tensor(1.0)), ValueError, r"F must have at least 1 dims, got shape \(\)"),
        (dict(F=torch.empty(0, 3)), ValueError, r"F must not be empty, got shape \(0, 3\)"),
        (dict(jvp_out=torch.randn(B, 3, 5)), ValueError, r"jvp_out must have the shape of F \(2, 3, 4\), got \(2, 3, 5\)"),
        (dict(x_t=torch.ones(B, 3, 4, dtype=torch.int32)), TypeError, r"x_t must have dtype in .*got torch.int32"),
        (dict(dxt_dt="x"), TypeError, r"dxt_dt must be a torch.Tensor, got str"),
        (dict(dxt_dt=torch.randn(B, 3, 4, device="meta")), ValueError, r"dxt_dt is on meta but F is on cpu"),
        (dict(F_minus=torch.randn(B, 4, 3)), ValueError, r"F_minus must have the shape of F .*got \(2, 4, 3\)"),
        (dict(t=torch.rand(3)), ValueError, r"t must be a scalar or hold one value per sample.*got shape \(3,\)"),
        (dict(t=torch.tensor([0.5, float("nan")])), ValueError, r"t must be finite"),
        (dict(t="0.5"), TypeError, r"t must be a real number, got str"),
        (dict(logvar=0.3), TypeError, r"logvar must be a torch.Tensor, got float"),
        (dict(logvar=torch.zeros(B + 1)), ValueError, r"logvar must hold one value per sample.*got shape \(3,\)"),
        (dict(logvar=torch.zeros(1, B)), ValueError, r"logvar must hold one value per sample.*got shape \(1, 2\)"),
        (dict(logvar=torch.zeros(B, dtype=torch.int64)), TypeError, r"logvar must have dtype in"),
        (dict(sigma_d=0.0), ValueError, r"sigma_d must be > 0, got 0.0"),
        (dict(sigma_d=True), TypeError, r"sigma_d must be a real number, got bool"),
        (dict(r=-0.5), ValueError, r"r must be >= 0, got -0.5"),
        (dict(r=float("inf")), ValueError, r"r must be finite, got inf"),
        (dict(c=0.0), ValueError, r"c must be > 0, got 0.0"),
        (dict(c="0.1"), TypeError, r"c must be a real number, got str"),
        (dict(backend="gpu"), ValueError, r"backend: expected one of"),
        (dict(backend="cuda"), ValueError, r"backend 'cuda' needs CUDA tensors, got tensors on cpu"),
    ]
    if _backend.triton_interpret() and _backend.triton_available():
        cases += [
            (dict(jvp_out=torch.randn(B, 3, 4, dtype=torch.float16), backend="triton"), TypeError,
             r"backend 'triton' needs F, jvp_out and F_minus of one dtype.*jvp_out torch.float16"),
            (dict(x_t=torch.randn(B, 3, 4, dtype=torch.float64), backend="triton"), TypeError,
             r"backend 'triton' needs .*x_t torch.float64, dxt_dt torch.float32"),
        ]
    for over, exc, match in cases:
        with pytest.raises(exc, match="scm_kernels.scm_loss: " + match if "backend:" not in match else match):
            call(**over)


# ---------------------------------------------------------------------------------------------
# Operator registration, AOT specs
# ---------------------------------------------------------------------------------------------
def _schema_args(kw):
    from scm_kernels import _layout

    rows = [_layout.as_rows(kw[k]) for k in ("F", "jvp_out", "x_t", "dxt_dt")]
    t = kw["t"].reshape(-1)
    lv = kw["logvar"].reshape(-1).float()
    fm = _layout.as_rows(kw["F_minus"])
    return rows, t, lv, fm


@pytest.mark.parametrize("ns", ["scm", "scm_triton"])
def test_opcheck(ns):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of the ops."""
    if ns == "scm" and not _backend.extension_available():
        pytest.skip("scm_kernels._C not built")
    if ns == "scm_triton" and not (_backend.triton_interpret() and _backend.triton_available()):
        pytest.skip("needs the Triton interpreter on CPU tensors")
    ops = getattr(torch.ops, ns)
    kw = make_case(3, (5, 7), torch.float32, data_dtype=torch.float16, layout="slice", lv="B", seed=31)
    (F, J, x, dx), t, lv, fm = _schema_args(kw)
    loss, gnorm, _ = ops.scm_loss(F, J, x, dx, t, lv, fm, 0.5, 1.0, 0.1)
    grad = torch.randn(3)
    for op, args in [
        (ops.scm_loss.default, (F, J, x, dx, t, lv, fm, 0.5, 1.0, 0.1)),
        (ops.scm_loss.default, (F, J, x, dx, t, None, None, 0.5, 0.0, 0.1)),
        (ops.scm_loss_backward.default, (grad, F, J, x, dx, t, lv, fm, gnorm, 0.5, 1.0, 0.1)),
        (ops.scm_loss_jvp.default, (torch.randn_like(F), F, J, x, dx, t, fm, gnorm, 0.5, 1.0, 0.1)),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.static
def test_aot_specs_cover_launchers():
    """AOT_SPECS name every argument of its kernel, cover every allowed dtype group with both
    switches, and match the launchers' tile."""
    specs = triton_kernels.AOT_SPECS
    for s in specs:
        assert list(s.signature) == list(s.fn.arg_names), s.kernel_name
        assert s.constexprs["BLOCK"] == triton_kernels._GPU[0] and s.num_warps == triton_kernels._GPU[1]
    tt = triton_kernels._TT
    for net, data in triton_kernels.DTYPE_GROUPS:
        for kernel in ("_scm_loss_fwd_kernel", "_scm_loss_bwd_kernel", "_scm_loss_jvp_kernel"):
            got = [s for s in specs if s.kernel_name == kernel and s.signature["F_ptr"] == tt[net]
                   and s.signature["X_ptr"] == tt[data]]
            n_lv = 1 if kernel == "_scm_loss_jvp_kernel" else 2
            assert len(got) == 2 * n_lv, (kernel, net, data)


def test_F_broadcast_over_batch(kernel_backend):
    """F itself expanded over the batch (row stride 0): the gradient sums over the samples."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(37)
    B = 3
    f0 = torch.randn(1, 2, 5, generator=gen, dtype=torch.float64)
    J, x, dx = (torch.randn(B, 2, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    t, lv = 0.05 + 1.5 * torch.rand(B, generator=gen, dtype=torch.float64), torch.randn(B, generator=gen,
                                                                                       dtype=torch.float64)
    res = []
    for dt, dev, fn in ((torch.float32, device, lambda a, *r: scm_loss(a, *r, backend=name)),
                        (torch.float64, "cpu", ref_loss), (torch.float32, "cpu", ref_loss)):
        a = f0.to(dtype=dt, device=dev, copy=True).requires_grad_()
        L = fn(a.expand(B, 2, 5), *(v.to(dtype=dt, device=dev) for v in (J, x, dx, t, lv)))
        L.sum().backward()
        res.append((L.detach().cpu(), a.grad.cpu()))
    assert_rule(res[0][0], res[1][0], res[2][0], torch.float32, what="loss")
    assert_rule(res[0][1], res[1][1], res[2][1], torch.float32, what="dL/dF")
