"""Test tiers, backend fixtures and THE tolerance table of the project.

Tiers (pytest markers): reference, interpreter (Triton under TRITON_INTERPRET=1 on CPU tensors),
cpu (the C++ kernels), static (ahead-of-time compilation for sm_80/sm_90), gpu (CUDA; skipped
without a device). Without a GPU, this file turns on the Triton interpreter before anything
imports triton, so that the whole suite runs here.

Tolerance rule (FlashAttention's): for an output in dtype `dt`,
    max |kernel - ref64|  <=  FACTOR * max |torch_dt - ref64|  +  FLOOR[dt] * max(1, max |ref64|)
where ref64 is the plain-PyTorch reference run in float64 on the same inputs and torch_dt is the
same reference run in the kernel's dtype (what eager PyTorch gives a user). The floor covers
kernels that are more exact than PyTorch (fp32 accumulation of fp16 inputs: PyTorch's own error
is then not a fair yardstick when it is zero, e.g. for a single rounding).
"""

from __future__ import annotations

import math
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could enable its interpreter"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from scm_kernels import backend as _backend  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The tolerance table (one place for the whole project)
# ---------------------------------------------------------------------------------------------
FACTOR = 2.0
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
# Tolerance for gradcheck/gradgradcheck and finite differences in float64.
FD_TOL = dict(atol=1e-6, rtol=1e-5)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    d = (a - b).abs()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros_like(d), d)
    return float("nan") if bool(torch.isnan(d).any()) else float(d.max())


def assert_rule(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype: torch.dtype,
                what: str = "output") -> None:
    """Assert the tolerance rule above for one output computed in `dtype`."""
    err = max_err(out, ref64)
    base = max_err(torch_lowp, ref64)
    if math.isnan(base):  # PyTorch itself fails here (e.g. its fp16 JVP of a one-element group): the floor
        base = 0.0
    scale = max(1.0, float(ref64.detach().abs().max())) if ref64.numel() else 1.0
    tol = FACTOR * base + FLOOR[dtype] * scale
    assert err <= tol, (f"{what}: max error {err:.3e} > {FACTOR} x PyTorch's {str(dtype)} error {base:.3e} "
                        f"+ floor {FLOOR[dtype]:.1e} x {scale:.3g} (= {tol:.3e})")


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
_has_ext = _backend.extension_available()
_interp = _backend.triton_interpret() and _backend.triton_available()
_cuda = torch.cuda.is_available()
_cuda_ext = _cuda and _backend.extension_has_cuda()

BACKEND_PARAMS = [
    pytest.param(("reference", "cpu"), marks=pytest.mark.reference, id="reference"),
    pytest.param(("cpu", "cpu"), marks=[pytest.mark.cpu, pytest.mark.skipif(not _has_ext, reason="scm_kernels._C not built")], id="cpu"),
    pytest.param(("triton", "cpu"), marks=[pytest.mark.interpreter, pytest.mark.skipif(not _interp, reason="needs TRITON_INTERPRET=1 and triton")], id="triton-interp"),
    pytest.param(("triton", "cuda"), marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda or _interp, reason="needs a CUDA device (and no interpreter)")], id="triton-cuda"),
    pytest.param(("cuda", "cuda"), marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda_ext, reason="needs a CUDA device and the CUDA extension")], id="cuda"),
]
KERNEL_BACKEND_PARAMS = BACKEND_PARAMS[1:]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """(backend name, device) for every backend that can run here, the reference included."""
    return request.param


@pytest.fixture(params=KERNEL_BACKEND_PARAMS)
def kernel_backend(request):
    """(backend name, device) for the kernel backends (not the reference)."""
    return request.param


def backend_param(request):
    """(backend name, device) of the test's `backend` or `kernel_backend` fixture, None without one."""
    for fixture in ("backend", "kernel_backend"):
        if fixture in request.fixturenames:
            return request.getfixturevalue(fixture)
    return None


@pytest.fixture
def on_backend_device(request):
    """Tensors that a test creates without naming a device land on its backend's device (a
    `torch.device` context), so that one test body runs on the CPU and on CUDA. For modules whose
    tests draw inputs with the default generator: `pytestmark = pytest.mark.usefixtures(...)`."""
    param = backend_param(request)
    if param is None:
        yield
        return
    with torch.device(param[1]):
        yield


DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---------------------------------------------------------------------------------------------
# Hypothesis: reproducible by default in CI; HYPOTHESIS_PROFILE=thorough for long local runs.
# ---------------------------------------------------------------------------------------------
settings.register_profile("default", max_examples=15, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(HYPOTHESIS_PROFILE)


def examples(n: int) -> int:
    """max_examples of a property test that sets its own count (a slow one): n in CI, the profile's
    count under HYPOTHESIS_PROFILE=thorough (an explicit @settings would otherwise override it)."""
    return max(n, settings.get_profile("thorough").max_examples) if HYPOTHESIS_PROFILE == "thorough" else n
