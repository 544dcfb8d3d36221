"""Backend choice (scm_kernels.backend): argument > context > environment > automatic."""

import subprocess
import sys
import textwrap

import pytest
import torch

from scm_kernels import backend as B

pytestmark = pytest.mark.reference


def test_automatic_choice_by_device(monkeypatch):
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    expected = "cpu" if B.extension_available() else "reference"
    assert B.select(torch.device("cpu")) == expected
    cuda = B.auto_backend(torch.device("cuda"))
    assert cuda == ("triton" if B.triton_available() else ("cuda" if B.extension_has_cuda() else "reference"))


def test_argument_context_environment_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(B.ENV_VAR, "reference")
    assert B.select(cpu) == "reference"
    if B.extension_available():
        with B.use_backend("cpu"):
            assert B.select(cpu) == "cpu"  # context beats environment
            assert B.select(cpu, "reference") == "reference"  # argument beats context
            with B.use_backend("reference"):
                assert B.select(cpu) == "reference"  # innermost context wins
            assert B.select(cpu) == "cpu"
    assert B.select(cpu) == "reference"
    monkeypatch.setenv(B.ENV_VAR, "auto")
    assert B.select(cpu) == B.auto_backend(cpu)


@pytest.mark.parametrize("bad", ["gpu", "Triton", "", 3])
def test_unknown_backend_names(monkeypatch, bad):
    with pytest.raises(ValueError, match="expected one of"):
        B.select(torch.device("cpu"), bad)
    with pytest.raises(ValueError, match="use_backend"):
        with B.use_backend(bad):
            pass
    if isinstance(bad, str) and bad:
        monkeypatch.setenv(B.ENV_VAR, bad)
        with pytest.raises(ValueError, match="SCM_KERNELS_BACKEND"):
            B.select(torch.device("cpu"))


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        B.select(cpu, "cuda")
    if B.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            B.select(cpu, "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert B.select(cpu, "triton") == "triton"
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
        B.select(torch.device("cuda"), "cpu")


def test_available_backends_lists_what_runs_here():
    got = B.available_backends("cpu")
    assert "reference" in got
    assert ("cpu" in got) == B.extension_available()
    assert "cuda" not in got


def _run(code: str, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_missing_extension_warns_once_and_falls_back():
    # Simulate a missing/broken extension: importing scm_kernels._C raises ImportError.
    res = _run("""
        import sys, warnings
        sys.modules["scm_kernels._C"] = None
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import scm_kernels
            from scm_kernels import backend
            a = backend.available_backends("cpu")
            b = backend.select(__import__("torch").device("cpu"))
            backend.extension_available()
        msgs = [str(x.message) for x in w if "scm_kernels._C" in str(x.message)]
        print(len(msgs), a, b)
        print(msgs[0] if msgs else "")
    """, {"TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr
    first, reason = res.stdout.splitlines()[:2]
    assert first == "1 ['reference'] reference", res.stdout
    assert "Error: import of scm_kernels._C" in reason and "not available" in reason, reason


@torch.library.custom_op("scm_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def test_eager_fast_skips_the_custom_op_only_in_plain_eager_mode():
    """Triton launchers run directly in eager mode (no custom-op dispatch, which costs ~0.2 ms of host
    time per call on a GPU host), and through their custom op under fake tensors, dispatch modes and
    torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from scm_kernels._launch import eager_fast

    f = eager_fast(_twice)
    assert f is not _twice
    x = torch.arange(3.0)
    with torch.profiler.profile() as prof:
        y = f(x)
    names = {e.name for e in prof.events()}
    assert torch.equal(y, x * 2) and "scm_test::twice" not in names
    with torch.profiler.profile() as prof:
        _twice(x)
    assert "scm_test::twice" in {e.name for e in prof.events()}  # the check above can fail
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = f(fx)
    assert out.shape == (3,) and type(out).__name__ == "FakeTensor"
    assert f(torch.empty(3, device="meta")).is_meta
    with FlopCounterMode(display=False):  # a dispatch mode sees the op
        assert torch.equal(f(x), x * 2)
    compiled = torch.compile(lambda t: f(t) + 1, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x * 2 + 1)
    _, tangent = torch.func.jvp(lambda t: f(t.detach()) + t, (x,), (torch.ones(3),))
    assert torch.equal(tangent, torch.ones(3))
