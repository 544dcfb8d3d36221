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
