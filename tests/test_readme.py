"""The README's Python examples run as written (with small stand-ins for the user's network)."""

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.reference

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace():
    torch.manual_seed(0)
    B = 4
    W = torch.randn(3, 3, 1, 1, requires_grad=True)
    head = torch.nn.Linear(256, 1)
    import scm_kernels

    def net(x, t):  # a tiny JVP-able F_theta(x, c_noise(t)) on the fused ops
        emb = scm_kernels.time_embedding(t, 8)
        return torch.nn.functional.conv2d(x, W) * emb[:, :1, None, None]

    return {
        "torch": torch,
        "scm_kernels": scm_kernels,
        "net": net,
        "w_phi": lambda t: head(scm_kernels.time_embedding(t, 256)),
        "x0": torch.rand(B, 3, 8, 8) * 2 - 1,
        "z": torch.randn(B, 3, 8, 8) * 0.5,
        "t": torch.rand(B) * 1.5,
        "W": W,
        "head": head,
    }


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    ns = _namespace()
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), ns)
    if "loss" in ns:  # the sCM example: a finite loss whose backward reaches the network and w_phi
        assert torch.isfinite(ns["loss"])
        assert ns["W"].grad is not None and torch.isfinite(ns["W"].grad).all()
        assert ns["head"].weight.grad is not None
    if "img" in ns:
        assert ns["img"].dtype == torch.uint8 and ns["img"].shape == (16, 3, 64, 64)
