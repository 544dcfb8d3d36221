"""torch.compile traces every op through its fake (meta) implementation, forward and backward.

aot_eager runs dynamo + AOTAutograd (which needs the fake kernels and the autograd Function) without
inductor's C++ code generation, so the test stays fast; the compiled forward and the gradients of
its output must equal eager exactly (the same kernels run).
"""

import pytest
import torch

import scm_kernels
from scm_kernels import backend as _backend

pytestmark = [pytest.mark.cpu, pytest.mark.skipif(not _backend.extension_available(), reason="scm_kernels._C not built")]


def _compare(fn, args, grad_of):
    torch._dynamo.reset()
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        for a in grad_of:
            a.grad = None
        out = f(*args)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append((out.detach(), [a.grad.clone() for a in grad_of]))
    (o1, g1), (o2, g2) = outs
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_time_embedding_compiles():
    t = torch.rand(13, requires_grad=True)
    _compare(lambda t: scm_kernels.time_embedding(t, 40, backend="cpu"), (t,), [t])


def test_trigflow_step_compiles():
    x = torch.randn(3, 2, 5, 7, requires_grad=True)
    F = torch.randn(3, 2, 5, 7, requires_grad=True)
    t = torch.rand(3) + 0.2
    _compare(lambda x, F, t: scm_kernels.trigflow_step(x, F, t, t_next=0.3, seed=7, backend="cpu"), (x, F, t), [x, F])


def test_scm_loss_compiles():
    shape = (4, 3, 6, 5)
    F = torch.randn(shape, requires_grad=True)
    J, x, dx = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t, lv = torch.rand(4) + 0.1, torch.randn(4, 1, requires_grad=True)
    _compare(lambda F, J, x, dx, t, lv: scm_kernels.scm_loss(F, J, x, dx, t, lv, backend="cpu"),
             (F, J, x, dx, t, lv), [F, lv])


def test_attention_compiles():
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, requires_grad=True)
    v = torch.randn(2, 2, 11, 5, requires_grad=True)
    mask = torch.rand(2, 1, 9, 11) > 0.2
    _compare(lambda q, k, v: scm_kernels.attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True,
                                                   backend="cpu"), (q, k, v), [q, k, v])


def test_attention_jvp_compiles():
    q, k, v = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in range(3))
    tq, tk, tv = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in range(3))

    def f(q, k, v, tq, tk, tv):
        out, tan = scm_kernels.attention_jvp(q, k, v, tq, tk, tv, backend="cpu")
        return out + 0.5 * tan

    _compare(f, (q, k, v, tq, tk, tv), [q, k, v, tq, tk, tv])


@pytest.mark.parametrize("where", ["jvp inside compile", "compile inside jvp"])
def test_attention_compiled_jvp_is_correct_or_refused(where):
    """Dynamo drops custom JVP rules (pytorch issue 192985): a JVP through a compiled call must give the
    eager tangent or raise a clear error, never a silently wrong tangent."""
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    tq, tk, tv = (torch.randn(1, 2, 6, 8) for _ in range(3))

    def f(q, k, v):
        return scm_kernels.attention(q, k, v, backend="cpu").sin()

    want = torch.func.jvp(f, (q, k, v), (tq, tk, tv))[1]
    torch._dynamo.reset()
    try:
        if where == "jvp inside compile":
            got = torch.compile(lambda *a: torch.func.jvp(f, a[:3], a[3:])[1], backend="aot_eager")(q, k, v, tq, tk, tv)
        else:
            got = torch.func.jvp(torch.compile(f, backend="aot_eager"), (q, k, v), (tq, tk, tv))[1]
    except Exception as e:  # noqa: BLE001 - refusing is allowed; the message must say why
        msg = str(e)
        assert "forward" in msg.lower() or "jvp" in msg.lower(), msg
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _loss_of_F(F):
    shape = F.shape
    g = torch.Generator().manual_seed(0)
    J, x, dx = (torch.randn(shape, generator=g) for _ in range(3))
    return scm_kernels.scm_loss(F, J, x, dx, torch.tensor([0.3, 0.9]), backend="cpu")


@pytest.mark.parametrize("fn", [
    _loss_of_F,
    lambda t: scm_kernels.time_embedding(t.sum(-1), 8, backend="cpu"),
    lambda x: scm_kernels.trigflow_step(x, x.cos(), torch.tensor([0.3, 0.9]), backend="cpu"),
], ids=["scm_loss", "time_embedding", "trigflow_step"])
def test_other_ops_compiled_jvp_is_correct_or_refused(fn):
    """The guard in scm_kernels._autograd.apply covers every op; where dynamo falls back to eager
    under the transform, the tangent must be the eager one."""
    x, tx = torch.rand(2, 3) + 0.1, torch.randn(2, 3)
    want = torch.func.jvp(fn, (x,), (tx,))[1]
    assert want.abs().max() > 0
    torch._dynamo.reset()
    try:
        got = torch.compile(lambda a, b: torch.func.jvp(fn, (a,), (b,))[1], backend="aot_eager")(x, tx)
    except Exception as e:  # noqa: BLE001
        assert "traced inside torch.compile is not supported" in str(e), str(e)
        return
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
