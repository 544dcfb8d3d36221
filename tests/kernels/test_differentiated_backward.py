"""A backward that is itself differentiated: torch.func.jvp over torch.func.grad (Hessian-vector
products), torch.func.grad of torch.func.grad, a create_graph=True double backward, forward_ad dual
tensors with a create_graph backward.

The fused kernels' backward passes detach their inputs and have no derivative of their own, so
without care the derivative of a gradient comes out as zero, silently. Every op computes it: such a
backward runs its formula in differentiable plain PyTorch (attention's (A26) with O(N^2) memory,
only there; group_norm's (A30); pixel_norm's, time_embedding's and scm_loss's), and trigflow_step's
backward is made of its own differentiable Functions; attention_jvp's (A27) and its second-order
jvp rule in plain PyTorch too (O(N^2) memory).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import scm_kernels as sk


def _dtype(name):
    return torch.float32 if name == "triton" else torch.float64


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


def _second(how, loss, xs, ts):
    """A second derivative of loss at xs in direction ts, three ways: (grad, its tangent) by jvp over
    grad; or the gradient of <grad, ts> by torch.func.grad of torch.func.grad, or by a create_graph
    double backward (both equal the Hessian-vector product, the Hessian being symmetric)."""
    argnums = tuple(range(len(xs)))
    if how == "jvp(grad)":
        return torch.func.jvp(torch.func.grad(loss, argnums=argnums), tuple(xs), tuple(ts))

    def inner(*z):
        g = torch.func.grad(loss, argnums=argnums)(*z)
        return sum((a * t).sum() for a, t in zip(g, ts)), g

    if how == "grad(grad)":
        h, g = torch.func.grad(inner, argnums=argnums, has_aux=True)(*xs)
        return g, h
    zs = [x.detach().clone().requires_grad_() for x in xs]
    g = torch.autograd.grad(loss(*zs), zs, create_graph=True)
    h = torch.autograd.grad(sum((a * t).sum() for a, t in zip(g, ts)), zs)
    return tuple(x.detach() for x in g), h


HOW = ["jvp(grad)", "grad(grad)", "double backward"]


ATTN_CASES = {
    "plain": dict(Hq=2, Hkv=2, mask=False, is_causal=False),
    "gqa 4:2, bool mask, causal": dict(Hq=4, Hkv=2, mask=True, is_causal=True),
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("case", list(ATTN_CASES), ids=list(ATTN_CASES))
def test_attention_hessian_vector_product(kernel_backend, case, how):
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    c = ATTN_CASES[case]
    dtype = _dtype(name)
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, c["Hq"], 11, 8), (1, c["Hkv"], 13, 8), (1, c["Hkv"], 13, 6)]
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ts = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    mask = (torch.rand(1, c["Hq"], 11, 13, generator=gen) > 0.3) if c["mask"] else None
    w = torch.randn(1, c["Hq"], 11, 6, generator=gen, dtype=torch.float64)
    kw = dict(attn_mask=mask, is_causal=c["is_causal"], enable_gqa=c["Hq"] != c["Hkv"])

    def loss(backend, w):
        return lambda q, k, v: (sk.attention(q, k, v, **kw, backend=backend) * w).pow(2).sum()

    want_g, want_h = _second(how, loss("reference", w), xs, ts)
    dev = [x.to(device, dtype) for x in xs]
    kw["attn_mask"] = None if mask is None else mask.to(device)
    got_g, got_h = _second(how, loss(name, w.to(device, dtype)), dev, [t.to(device, dtype) for t in ts])
    for a, b in zip(got_g + got_h, want_g + want_h):
        torch.testing.assert_close(a.cpu().double(), b, **_tol(dtype))
    assert all(float(h.abs().max()) > 0 for h in got_h)


def test_attention_grad_inside_unrelated_jvp(kernel_backend):
    """A gradient that does not depend on the JVP's input, taken inside it: the same numbers as
    outside (the differentiable path is used, the result is unchanged)."""
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    dtype = _dtype(name)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(3))
    x, tx = torch.randn(3, dtype=dtype, device=device), torch.randn(3, dtype=dtype, device=device)

    def loss(q):
        return sk.attention(q, k, v, backend=name).pow(2).sum()

    plain = torch.func.grad(loss)(q)
    out, tangent = torch.func.jvp(lambda x: torch.func.grad(loss)(q).sum() * x, (x,), (tx,))
    torch.testing.assert_close(out, plain.sum() * x, **_tol(dtype))
    torch.testing.assert_close(tangent, plain.sum() * tx, **_tol(dtype))


JVP_CASES = {
    "plain": dict(Hq=2, Hkv=2, mask=False, is_causal=False, absent=()),
    "gqa 4:2, bool mask, causal": dict(Hq=4, Hkv=2, mask=True, is_causal=True, absent=()),
    "no key tangent": dict(Hq=2, Hkv=2, mask=False, is_causal=True, absent=(4,)),
    "value tangent only": dict(Hq=2, Hkv=1, mask=False, is_causal=False, absent=(3, 4)),
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("case", list(JVP_CASES), ids=list(JVP_CASES))
def test_attention_jvp_hessian_vector_product(kernel_backend, case, how):
    """attention_jvp's backward (A27) differentiated once more, w.r.t. all six operands (q, k, v and
    the tangents given): the reference's gradient and Hessian-vector product, for a loss on both
    outputs. jvp(grad) also runs attention_jvp's own second-order jvp rule in the forward."""
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    c = JVP_CASES[case]
    dtype = _dtype(name)
    gen = torch.Generator().manual_seed(12)
    shapes = [(1, c["Hq"], 9, 8), (1, c["Hkv"], 11, 8), (1, c["Hkv"], 11, 6)] * 2
    used = [i for i in range(6) if i not in c["absent"]]
    xs = [torch.randn(shapes[i], generator=gen, dtype=torch.float64) for i in used]
    ts = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
    mask = (torch.rand(1, c["Hq"], 9, 11, generator=gen) > 0.3) if c["mask"] else None
    if mask is not None:
        mask[0, 0, 2] = False  # a fully masked row: zero outputs and zero derivatives
    w = torch.randn(2, 1, c["Hq"], 9, 6, generator=gen, dtype=torch.float64)
    kw = dict(attn_mask=mask, is_causal=c["is_causal"], enable_gqa=c["Hq"] != c["Hkv"])

    def loss(backend, w):
        def f(*z):
            ops = [None] * 6
            for i, x in zip(used, z):
                ops[i] = x
            out, out_t = sk.attention_jvp(*ops, **kw, backend=backend)
            return (out * w[0]).pow(2).sum() + (out_t * w[1]).pow(2).sum() + (out * out_t).sum()
        return f

    want_g, want_h = _second(how, loss("reference", w), xs, ts)
    kw["attn_mask"] = None if mask is None else mask.to(device)
    got_g, got_h = _second(how, loss(name, w.to(device, dtype)), [x.to(device, dtype) for x in xs],
                           [t.to(device, dtype) for t in ts])
    assert len(got_h) == len(used)
    for a, b in zip(got_g + got_h, want_g + want_h):
        torch.testing.assert_close(a.cpu().double(), b, **_tol(dtype))
    assert all(float(h.abs().max()) > 1e-3 for h in want_h)


def test_attention_jvp_gradgradcheck(kernel_backend):
    """gradgradcheck of attention_jvp (both outputs) on the float64 backends: the differentiated
    (A27) against finite differences of the kernels' own (A27)."""
    name, device = kernel_backend
    if name == "cuda" or _dtype(name) != torch.float64:
        pytest.skip("gradgradcheck needs a float64 attention backend")
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
          for _ in range(6)]

    def f(q, k, v, tq, tk, tv):
        return sk.attention_jvp(q, k, v, tq, tk, tv, is_causal=True, backend=name)

    assert torch.autograd.gradgradcheck(f, xs, atol=1e-6, rtol=1e-5)


def test_attention_grad_under_forward_ad(kernel_backend):
    """forward_ad dual tensors with a create_graph backward: attention under forward AD runs the fused
    primal+tangent Function, whose backward is then differentiated in forward mode; the tangent of
    the gradient equals the reference's (not zero, not an error)."""
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    dtype = _dtype(name)
    gen = torch.Generator().manual_seed(14)
    q, k, v, tq = (torch.randn(1, 2, 7, 8, generator=gen, dtype=torch.float64) for _ in range(4))

    def grad_and_tangent(backend, dev, dt):
        with fwAD.dual_level():
            qd = fwAD.make_dual(q.to(dev, dt).requires_grad_(), tq.to(dev, dt))
            loss = sk.attention(qd, k.to(dev, dt), v.to(dev, dt), backend=backend).pow(2).sum()
            (g,) = torch.autograd.grad(loss, qd, create_graph=True)
            p, t = fwAD.unpack_dual(g)
            return p.detach().cpu().double(), t.detach().cpu().double()

    got = grad_and_tangent(name, device, dtype)
    want = grad_and_tangent("reference", "cpu", torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **_tol(dtype))
    assert float(want[1].abs().max()) > 1e-3


def _other_ops(device, dtype):
    gen = torch.Generator().manual_seed(5)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype)

    x, w, b, sc, sh = r(2, 8, 5, 5), r(8), r(8), r(2, 8), r(2, 8)
    a = r(3, 6, 4, 4)
    t = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.1).to(device, dtype)
    xt, F, J, dx = r(3, 2, 4, 4), r(3, 2, 4, 4), r(3, 2, 4, 4), r(3, 2, 4, 4)
    tt = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.2).to(device, dtype)
    return {
        "group_norm": (lambda be: lambda z: sk.group_norm(z, 4, w, b, scale=sc, shift=sh, activation="silu",
                                                          backend=be).pow(2).sum(), x),
        "pixel_norm": (lambda be: lambda z: sk.pixel_norm(z, backend=be).pow(3).sum(), a),
        "time_embedding": (lambda be: lambda z: sk.time_embedding(z, 16, backend=be).pow(3).sum(), t),
        "scm_loss": (lambda be: lambda z: sk.scm_loss(z, J, xt, dx, tt, backend=be).sum(), F),
        "trigflow_step": (lambda be: lambda z: sk.trigflow_step(z, F, tt, backend=be).pow(3).sum(), xt),
    }


OPS = ["group_norm", "pixel_norm", "time_embedding", "scm_loss", "trigflow_step"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("op", OPS)
def test_other_ops_differentiated_backward(kernel_backend, op, how):
    """Every other op gives the reference's gradient and second derivative, never a zero one."""
    name, device = kernel_backend
    dtype = _dtype(name)
    make, z = _other_ops(device, dtype)[op]
    # not a constant direction: group_norm's output does not change along one (per group)
    tz = torch.linspace(-1.0, 1.0, z.numel(), dtype=torch.float64).reshape(z.shape).to(device, dtype)
    g, got = _second(how, make(name), [z], [tz])
    g_want, want = _second(how, make("reference"), [z], [tz])
    # group_norm's and pixel_norm's kernels keep fp32 statistics, time_embedding computes in fp32,
    # for every dtype (the gradient carries that rounding)
    tol = dict(rtol=1e-5, atol=1e-5) if op == "trigflow_step" else _tol(torch.float32)
    torch.testing.assert_close(g[0], g_want[0], **tol)
    torch.testing.assert_close(got[0], want[0], **tol)
    assert float(want[0].abs().max()) > 1e-3  # a real second derivative, not a pair of zeros


@pytest.mark.parametrize("how", HOW)
def test_second_derivatives_of_every_operand(kernel_backend, how):
    """The differentiated backward w.r.t. operands besides the first: scm_loss's F and logvar (with
    a given F^-), time_embedding's t and Fourier frequencies, pixel_norm over the last dim of a
    channels_last tensor (its rows layout)."""
    name, device = kernel_backend
    dtype = _dtype(name)
    gen = torch.Generator().manual_seed(11)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype)

    J, xt, dx, Fm = r(3, 2, 4, 4), r(3, 2, 4, 4), r(3, 2, 4, 4), r(3, 2, 4, 4)
    tt = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.2).to(device, dtype)
    cases = {
        "scm_loss": (lambda be: lambda F, lv: (sk.scm_loss(F, J, xt, dx, tt, logvar=lv, F_minus=Fm, backend=be)
                                               ** 2).sum(), [r(3, 2, 4, 4), 0.5 * r(3)]),
        "time_embedding": (lambda be: lambda t, f: sk.time_embedding(t, 9, kind="fourier", freqs=f, backend=be)
                           .pow(3).sum(), [(torch.rand(4, generator=gen, dtype=torch.float64) + 0.1)
                                           .to(device, dtype), 0.3 * r(4)]),
        "pixel_norm": (lambda be: lambda a: sk.pixel_norm(a, dim=1, backend=be).pow(3).sum(),
                       [r(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)]),
    }
    for op, (make, xs) in cases.items():
        ts = [r(*x.shape) for x in xs]
        g, got = _second(how, make(name), xs, ts)
        g_want, want = _second(how, make("reference"), xs, ts)
        for a, b, c, d in zip(g, g_want, got, want):
            torch.testing.assert_close(a, b, **_tol(torch.float32), msg=lambda m: f"{op}: {m}")
            torch.testing.assert_close(c, d, **_tol(torch.float32), msg=lambda m: f"{op}: {m}")
            assert float(d.abs().max()) > 1e-3, op


@pytest.mark.parametrize("op", ["pixel_norm", "time_embedding", "scm_loss"])
def test_gradgradcheck(kernel_backend, op):
    """torch.autograd.gradgradcheck on the float64 backends: the double backward against finite
    differences of the first backward (the kernels' own, with their fp32 statistics: eps = 1e-3)."""
    name, device = kernel_backend
    if _dtype(name) != torch.float64:
        pytest.skip("gradgradcheck needs float64")
    gen = torch.Generator().manual_seed(6)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device)

    if op == "pixel_norm":
        xs, f = [r(2, 4, 3)], lambda a: sk.pixel_norm(a, backend=name)
    elif op == "time_embedding":
        xs = [torch.rand(3, generator=gen, dtype=torch.float64).to(device), 0.3 * r(3)]

        def f(t, fr):
            return sk.time_embedding(t, 7, kind="fourier", freqs=fr, backend=name)
    else:
        # a given F^-: with the default stop-gradient F^- = F.detach(), finite differences of the loss
        # also move F^- (and g^), which its gradient by definition ignores
        J, xt, dx, Fm = r(2, 3, 2), r(2, 3, 2), r(2, 3, 2), r(2, 3, 2)
        tt = torch.rand(2, generator=gen, dtype=torch.float64).to(device) + 0.2
        xs = [r(2, 3, 2), 0.5 * r(2)]

        def f(F, lv):
            return sk.scm_loss(F, J, xt, dx, tt, logvar=lv, F_minus=Fm, backend=name)
    xs = [x.requires_grad_() for x in xs]
    assert torch.autograd.gradgradcheck(f, xs, eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_group_norm_second_derivatives(kernel_backend, how, layout):
    """group_norm's differentiated backward ((A30) in differentiable PyTorch) w.r.t. all five
    operands at once (x, gamma, beta, scale, shift), SiLU and modulation on, both layouts: the
    reference's gradient and Hessian-vector product."""
    name, device = kernel_backend
    dtype = _dtype(name)
    gen = torch.Generator().manual_seed(9)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype)

    x = r(2, 8, 3, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xs = [x, r(8), r(8), r(2, 8), r(2, 8)]
    ts = [r(*t.shape) for t in xs]

    def make(be):
        def loss(x, w, b, sc, sh):
            y = sk.group_norm(x, 4, w, b, scale=sc, shift=sh, activation="silu", backend=be)
            return (y * y * torch.linspace(0.5, 1.5, y.shape[-1], device=device, dtype=dtype)).sum()
        return loss

    g, got = _second(how, make(name), xs, ts)
    g_want, want = _second(how, make("reference"), xs, ts)
    for a, b, c, d in zip(g, g_want, got, want):  # fp32 statistics in the kernels' forward, any dtype
        torch.testing.assert_close(a, b, **_tol(torch.float32))
        torch.testing.assert_close(c, d, **_tol(torch.float32))
        assert float(d.abs().max()) > 1e-3


def test_group_norm_gradgradcheck(kernel_backend):
    """torch.autograd.gradgradcheck of group_norm on the float64 backends: the double backward
    against finite differences of the first backward. The kernels compute in fp32 (also the first
    backward that the differences evaluate), so eps = 1e-3 as in test_group_norm.py's gradcheck."""
    name, device = kernel_backend
    if _dtype(name) != torch.float64:
        pytest.skip("gradgradcheck needs float64")
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_()
          for s in ((2, 4, 3, 2), (4,), (4,), (2, 4), (2, 4))]

    def f(x, w, b, sc, sh):
        return sk.group_norm(x, 2, w, b, scale=sc, shift=sh, activation="silu", backend=name)

    assert torch.autograd.gradgradcheck(f, xs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_first_order_paths_stay_on_the_kernels(kernel_backend, monkeypatch):
    """A plain backward, torch.func.grad alone and torch.func.jvp alone never take the differentiable
    fallback (which would cost O(N^2) memory)."""
    name, device = kernel_backend
    if name == "cuda":
        pytest.skip("attention has no CUDA C++ kernel")
    from scm_kernels.attention import function

    def boom(*a, **k):
        raise AssertionError("reference_backward taken on a first-order path")

    monkeypatch.setattr(function, "reference_backward", boom)
    monkeypatch.setattr(function, "reference_jvp_backward", boom)
    monkeypatch.setattr(function, "reference_jvp_jvp", boom)
    from scm_kernels.group_norm import function as gn_function

    monkeypatch.setattr(gn_function, "reference_backward", boom)
    from scm_kernels.pixel_norm import function as pn_function
    from scm_kernels.scm_loss import function as sl_function
    from scm_kernels.time_embedding import function as te_function

    for mod in (pn_function, sl_function, te_function):
        monkeypatch.setattr(mod, "reference_backward", boom)
    dtype = _dtype(name)
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=dtype, device=device) for _ in range(3))

    def loss(q):
        return sk.attention(q, k, v, backend=name).pow(2).sum()

    qq = q.clone().requires_grad_()
    loss(qq).backward()
    torch.func.grad(loss)(q)
    torch.func.jvp(loss, (q,), (torch.ones_like(q),))
    with torch.enable_grad():  # vjp_fn runs its backward with create_graph = grad mode
        torch.func.vjp(loss, q)[1](torch.ones((), dtype=dtype, device=device))

    def jvp_loss(q, tq):  # attention_jvp's (A27) and the gradient of a JVP taken by torch.func.jvp
        out, out_t = sk.attention_jvp(q, k, v, tq, None, v, backend=name)
        return (out * out_t).sum() + torch.func.jvp(loss, (q,), (tq,))[1]

    qq, tq = q.clone().requires_grad_(), torch.randn_like(q).requires_grad_()
    jvp_loss(qq, tq).backward()
    torch.func.grad(jvp_loss, argnums=(0, 1))(q, tq)
    with fwAD.dual_level():  # forward_ad as sCM uses it: a loss on the unpacked primal and tangent
        out, out_t = fwAD.unpack_dual(sk.attention(fwAD.make_dual(qq, tq), k, v, backend=name))
        (out * out_t).sum().backward()
    for op, (make, z) in _other_ops(device, dtype).items():  # and the other ops do not refuse them
        zz = z.clone().requires_grad_()
        make(name)(zz).backward()
        torch.func.grad(make(name))(z)
        with torch.enable_grad():
            torch.func.vjp(make(name), z)[1](torch.ones((), dtype=dtype, device=device))
