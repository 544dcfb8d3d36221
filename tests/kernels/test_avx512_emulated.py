"""The CPU GroupNorm's explicit AVX-512 kernels (csrc/cpu/group_norm.cpp) on a CPU without AVX-512.

On such a CPU the run-time dispatch never takes those kernels, so tests/kernels/test_group_norm.py
checks only the portable loops. This test builds a copy of the extension with SCM_AVX512_EMULATE=1
(each AVX-512 intrinsic modelled in software by csrc/cpu/avx512_emulated.h on top of SIMDe, and the
kernels taken whatever the CPU), then runs the CPU tests of test_group_norm.py against that copy in a
subprocess: references, JVP against torch.func.jvp and finite differences, gradcheck, the half
precision in-register paths against fp32, determinism. Skipped where the CPU has AVX-512 (the same
tests run those kernels natively) and where SIMDe's headers are missing (Debian: libsimde-dev; CI
installs it). The build (about 2 min on 2 cores) is cached under ~/.cache/scm_kernels/avx512_emulated
(or $SCM_AVX512_EMULATED_CACHE), keyed by setup.py and csrc/; Python files and tests are copied
afresh on every run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUILT = ("setup.py", "csrc")  # what the extension is built from: the key of the cached build
COPIED = BUILT + ("pyproject.toml", "scm_kernels", "scm", "tests")  # refreshed on every run
SIMDE = Path("/usr/include/simde/x86/avx512.h")


def _cpu_has_avx512() -> bool:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= set(flags.split())


def _has_ext() -> bool:
    try:
        from scm_kernels import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _files(names):
    for name in names:
        p = ROOT / name
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".so", ".pyc"):
                yield f


def _build() -> Path:
    """A copy of the sources with the emulated extension built in place: built once per content of
    setup.py and csrc/, the Python files and tests copied afresh on every run."""
    h = hashlib.sha256()
    for f in _files(BUILT):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    default = Path.home() / ".cache" / "scm_kernels" / "avx512_emulated"
    cache = Path(os.environ.get("SCM_AVX512_EMULATED_CACHE") or default)
    dest = cache / h.hexdigest()[:16]
    built = bool(list((dest / "scm_kernels").glob("_C*.so")))
    if not built:
        shutil.rmtree(cache, ignore_errors=True)  # older builds
    for name in ("scm_kernels", "scm", "tests"):  # no stale module or test survives a refresh
        for f in (dest / name).rglob("*.py") if (dest / name).exists() else ():
            f.unlink()
    for f in _files(COPIED):
        out = dest / f.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
    if not built:
        env = {**os.environ, "SCM_AVX512_EMULATE": "1", "SCM_KERNELS_NO_CUDA": "1"}
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest, env=env,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"emulated build failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return dest


@pytest.mark.cpu
@pytest.mark.slow
@pytest.mark.skipif(_cpu_has_avx512(),
                    reason="the CPU has AVX-512: test_group_norm.py runs these kernels natively")
@pytest.mark.skipif(not SIMDE.exists(), reason=f"SIMDe's headers are missing ({SIMDE}; Debian: libsimde-dev)")
@pytest.mark.skipif(not _has_ext(), reason="scm_kernels._C not built")
def test_group_norm_cpu_tests_on_emulated_avx512(tmp_path):
    dest = _build()
    env = {**os.environ, "PYTHONPATH": str(dest)}
    env.pop("TRITON_INTERPRET", None)
    # The copy computes with the AVX-512 kernels: its SiLU (table-based 2^t) differs from the native
    # build's portable one in the last bits of some elements, and agrees to fp32 accuracy.
    x = torch.randn(2, 64, 37, generator=torch.Generator().manual_seed(0)) * 4
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, scm_kernels; "
            f"x = torch.load(r'{tmp_path / 'x.pt'}'); "
            "y = torch.ops.scm.group_norm(x, None, None, None, None, 8, 1e-5, True)[0]; "
            f"torch.save((scm_kernels._C.__file__, y), r'{tmp_path / 'y.pt'}')")
    r = subprocess.run([sys.executable, "-c", code], cwd=dest, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    so, y = torch.load(tmp_path / "y.pt")
    assert Path(so).resolve().is_relative_to(dest.resolve())
    native = torch.ops.scm.group_norm(x, None, None, None, None, 8, 1e-5, True)[0]
    assert not torch.equal(y, native)
    torch.testing.assert_close(y, native, rtol=2e-6, atol=2e-6)

    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cpu",
                        "tests/kernels/test_group_norm.py"], cwd=dest, env=env, capture_output=True,
                       text=True, timeout=1800)
    tail = r.stdout[-6000:]
    assert r.returncode == 0, (f"test_group_norm.py on the emulated AVX-512 build failed:\n{tail}\n"
                               f"{r.stderr[-3000:]}")
    assert " passed" in tail and " failed" not in tail
