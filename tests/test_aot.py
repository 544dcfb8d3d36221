"""Static tier: `python -m scm_kernels.aot` compiles every Triton kernel configuration and every
csrc/cuda/*.cu for sm_80 and sm_90 and fails on spills, shared memory over the limit, missing
tensor-core instructions and compile errors.

The project's own kernels must come out clean (test_project_kernels_compile_clean). The detection
itself is proven on toy kernels that really spill / overflow shared memory / miss MMA, compiled by
the real tools (triton, ptxas, nvcc, cuobjdump): nothing here is mocked. The tests run the tool in
subprocesses without TRITON_INTERPRET (this test process runs under the interpreter, where
@triton.jit does not make compilable JITFunctions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scm_kernels import aot

pytestmark = [
    pytest.mark.static,
    pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(aot.find_tool("cuobjdump") is None, reason="needs cuobjdump (ships with triton)"),
]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit)")

REPO = Path(__file__).resolve().parents[1]


def _env(*paths) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, paths), env.get("PYTHONPATH", "")])
    return env


def _aot(args, *paths, env=None, timeout=1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scm_kernels.aot", *args], cwd=REPO, capture_output=True,
                          text=True, env=env or _env(*paths), timeout=timeout)


def _rows(p: subprocess.CompletedProcess) -> list:
    try:
        return json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"not JSON (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}") from None


def _one(rows, kernel, arch, config_part=""):
    hit = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch and config_part in r["config"]]
    assert len(hit) == 1, f"expected one row {kernel} sm_{arch} [{config_part}], got {len(hit)}: {rows}"
    return hit[0]


# ---------------------------------------------------------------------------------------------
# Toy Triton kernels (written to a module file, imported by the tool in its own process)
# ---------------------------------------------------------------------------------------------
TOY_TRITON = '''
import triton
import triton.language as tl
from scm_kernels.aot import spec


@triton.jit
def toy_copy(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=m) * 2.0, mask=m)


@triton.jit
def toy_dot(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BN + rn[None, :], acc)


# A (BM, BN) fp32 tile per program, carried through a loop: with one warp that is BM*BN/32
# values per thread, far over the 255-register limit at 128x64 -> ptxas spills to the stack.
@triton.jit
def toy_spill(X, Y, N, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    acc = tl.load(X + rm[:, None] * BN + rn[None, :])
    for i in range(N):
        v = tl.load(X + i * BM * BN + rm[:, None] * BN + rn[None, :])
        acc = acc * v + tl.sqrt(tl.abs(acc))
    tl.store(Y + rm[:, None] * BN + rn[None, :], acc)


COPY = spec("toy", toy_copy, {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
DOT_SIG = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
           "BK": "constexpr"}
DOT = spec("toy", toy_dot, DOT_SIG, {"BM": 64, "BN": 64, "BK": 32}, expects_mma=True)
SPILL = spec("toy", toy_spill, {"X": "*fp32", "Y": "*fp32", "N": "i32", "BM": "constexpr", "BN": "constexpr"},
             {"BM": 128, "BN": 64}, num_warps=1, num_stages=1)
# fp32 256x256x64 tiles, 4 pipeline stages: 4 * (256*64 + 64*256) * 4 B = 512 KiB of shared memory.
BIG_SMEM = spec("toy", toy_dot, dict(DOT_SIG, A="*fp32", B="*fp32"), {"BM": 256, "BN": 256, "BK": 64},
                num_warps=8, num_stages=4)
NO_MMA = spec("toy", toy_copy, COPY.signature, {"BLOCK": 512}, expects_mma=True)
BAD_SIG = spec("toy", toy_copy, {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 256})

CLEAN_SPECS = [COPY, DOT]
AOT_SPECS = [COPY, DOT, SPILL, BIG_SMEM, NO_MMA, BAD_SIG]
'''

# `(A * B).to(...)` compiles for any runtime A, B, but Triton turns an int argument equal to 1 into
# the constant 1: with A = B = 1 the product is a Python int without `.to` (seen on an H100).
TOY_ONES = '''
import triton
import triton.language as tl
from scm_kernels.aot import spec


@triton.jit
def toy_ones(X, A, B, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) / (A * B).to(tl.float32))


@triton.jit
def toy_ones_cast(X, A, B, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) / tl.cast(A * B, tl.float32))


@triton.jit(do_not_specialize=["A", "B"])
def toy_ones_unspecialized(X, A, B, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) / (A * B).to(tl.float32))


SIG = {"X": "*fp32", "A": "i32", "B": "i32", "BLOCK": "constexpr"}
AOT_SPECS = [spec("toy", f, SIG, {"BLOCK": 128}) for f in (toy_ones, toy_ones_cast, toy_ones_unspecialized)]
'''
TOY_CLEAN = "from toy_aot_kernels import CLEAN_SPECS as AOT_SPECS\n"
TOY_BROKEN = "import toy_aot_kernels\nraise ImportError('toy module that cannot be imported')\n"


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_aot")
    (d / "toy_aot_kernels.py").write_text(TOY_TRITON)
    (d / "toy_aot_clean.py").write_text(TOY_CLEAN)
    (d / "toy_aot_broken.py").write_text(TOY_BROKEN)
    (d / "toy_aot_ones.py").write_text(TOY_ONES)
    return d


@pytest.fixture(scope="module")
def toy_report(toy_dir):
    """One CLI run over all toy Triton specs and an unimportable module, both archs, no cache."""
    p = _aot(["--json", "--no-discover", "--no-cache", "--arch", "80,90", "--module", "toy_aot_kernels",
              "--module", "toy_aot_broken"], toy_dir)
    return p, _rows(p)


def test_toy_triton_detection(toy_report):
    p, rows = toy_report
    assert p.returncode == 1, p.stderr[-3000:]
    assert "failed" in p.stderr.splitlines()[-1]
    for arch in (80, 90):
        copy = _one(rows, "toy_copy", arch, "BLOCK=1024")
        assert copy["status"] == "ok", copy
        assert copy["registers"] > 0 and copy["stack_bytes"] == 0 and copy["local_bytes"] == 0
        assert copy["mma"] == 0 and copy["shared_limit"] == aot.SHARED_LIMIT[arch]

        dot = _one(rows, "toy_dot", arch, "BM=64")
        assert dot["status"] == "ok", dot
        assert dot["mma"] > 0 and 0 < dot["shared_bytes"] <= aot.SHARED_LIMIT[arch]

        spill = _one(rows, "toy_spill", arch)
        assert spill["status"] == "FAIL" and spill["stack_bytes"] > 0, spill
        assert any(pr.startswith("spills: stack") for pr in spill["problems"]), spill["problems"]

        big = _one(rows, "toy_dot", arch, "BM=256")
        assert big["shared_bytes"] > aot.SHARED_LIMIT[arch], big
        assert any(f"> sm_{arch} limit {aot.SHARED_LIMIT[arch]} B" in pr for pr in big["problems"]), big

        no_mma = _one(rows, "toy_copy", arch, "BLOCK=512")
        assert no_mma["status"] == "FAIL" and no_mma["mma"] == 0
        assert any("tensor-core" in pr for pr in no_mma["problems"]), no_mma["problems"]

        bad = _one(rows, "toy_copy", arch, "BLOCK=256")
        assert bad["status"] == "FAIL" and bad["registers"] is None
        assert "signature must name every argument" in bad["problems"][0] and "'N'" in bad["problems"][0]
    broken = [r for r in rows if r["op"] == "toy_aot_broken"]
    assert len(broken) == 1 and broken[0]["kernel"] == "<import>" and broken[0]["status"] == "FAIL"
    assert "toy module that cannot be imported" in broken[0]["problems"][0]


def test_int_arguments_equal_to_one(toy_dir):
    """A kernel whose front end breaks when an int argument is 1 fails with its own row; tl.cast and
    do_not_specialize pass; the cubins of all three compile."""
    p = _aot(["--json", "--no-discover", "--no-cache", "--arch", "90", "--module", "toy_aot_ones"], toy_dir)
    rows = _rows(p)
    assert p.returncode == 1
    ones = [r for r in rows if "int arguments = 1" in r["config"]]
    assert [r["kernel"] for r in ones] == ["toy_ones"], rows
    assert ones[0]["status"] == "FAIL" and "has no attribute 'to'" in ones[0]["problems"][0]
    assert sorted(r["kernel"] for r in rows if r["arch"] == 90 and r["status"] == "ok") == \
        ["toy_ones", "toy_ones_cast", "toy_ones_unspecialized"]


def test_clean_toys_exit_zero_and_table(toy_dir):
    """Exit status 0 when nothing fails; the text table names every row; TRITON_INTERPRET in the
    caller's environment is dropped by a re-exec (the JSON rows have real register counts)."""
    p = _aot(["--no-discover", "--arch", "80,90", "--module", "toy_aot_clean", "--jobs", "1"], toy_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["op", "kernel", "arch", "config"]
    assert sum("toy_copy" in ln and "ok" in ln for ln in lines) == 2
    assert sum("toy_dot" in ln and "ok" in ln for ln in lines) == 2
    assert lines[-1].startswith("scm_kernels.aot: 4 rows (4 Triton, 0 CUDA), 0 failed")

    env = dict(_env(toy_dir), TRITON_INTERPRET="1")
    p = _aot(["--json", "--no-discover", "--arch", "90", "--module", "toy_aot_clean"], env=env)
    rows = _rows(p)
    assert p.returncode == 0 and len(rows) == 2 and all(r["registers"] > 0 for r in rows), rows


def test_function_api_and_parsers_on_real_cubins(toy_dir, tmp_path):
    """aot.run(specs, archs) in a process without the interpreter; the cubins it measures, dumped
    here with cuobjdump, parse to the same numbers."""
    script = textwrap.dedent(f"""
        import json, sys
        from scm_kernels import aot
        import toy_aot_kernels as t
        rows = aot.run([t.COPY, t.DOT, t.SPILL], [80], jobs=1, cache_dir=None)
        for name, s in (("copy", t.COPY), ("dot", t.DOT), ("spill", t.SPILL)):
            open(r"{tmp_path}/" + name + ".cubin", "wb").write(aot.compile_triton(s, 80)["cubin"])
        json.dump(rows, sys.stdout)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(toy_dir),
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"toy_copy", "toy_dot", "toy_spill"}
    cuobjdump = aot.find_tool("cuobjdump")
    for name in ("copy", "dot", "spill"):
        cubin = str(tmp_path / f"{name}.cubin")
        usage = aot.parse_resource_usage(subprocess.run([cuobjdump, "--dump-resource-usage", cubin],
                                                        capture_output=True, text=True, check=True).stdout)
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
        row = rows[f"toy_{name}"]
        u = usage[f"toy_{name}"]
        assert (u["REG"], u["STACK"], u["LOCAL"]) == (row["registers"], row["stack_bytes"], row["local_bytes"])
        mma = aot.count_mma(sass, aot.MMA_OPCODES[80])[f"toy_{name}"]
        assert mma == row["mma"] == sum(ln.split("*/")[1].strip().startswith("HMMA") for ln in sass.splitlines()
                                        if "*/" in ln and "HMMA" in ln)
    assert rows["toy_spill"]["stack_bytes"] > 0 and rows["toy_spill"]["status"] == "FAIL"
    assert rows["toy_copy"]["stack_bytes"] == 0 and rows["toy_dot"]["mma"] > 0


# ---------------------------------------------------------------------------------------------
# Toy CUDA files (no torch headers, so that nvcc takes seconds)
# ---------------------------------------------------------------------------------------------
TOY_CU = r"""
#include <mma.h>

// 64 live accumulators per thread, capped at 32 registers by the launch bounds: ptxas spills.
__global__ void __launch_bounds__(1024, 2) toy_spill(const float* __restrict__ x, float* __restrict__ y, int n) {
  float acc[64];
#pragma unroll
  for (int j = 0; j < 64; ++j) acc[j] = x[j * n + threadIdx.x];
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = acc[j] * acc[(j + 1) & 63] + x[it];
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 64; ++j) s += acc[j] * (j + 1);
  y[threadIdx.x] = s;
}

__global__ void toy_clean(const float* __restrict__ x, float* __restrict__ y, long long n) {
  __shared__ float buf[256];
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) y[i] = buf[255 - threadIdx.x] * 2.f;
}

// One 16x16x16 fp16 tensor-core product per warp (WMMA -> HMMA).
__global__ void toy_wmma(const __half* a, const __half* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
"""
TOY_CU_BROKEN = "__global__ void toy_broken(float* y) { y[0] = undefined_name; }\n"


@needs_nvcc
def test_toy_cuda_detection(tmp_path):
    (tmp_path / "toy.cu").write_text(TOY_CU)
    (tmp_path / "toy_broken.cu").write_text(TOY_CU_BROKEN)
    p = _aot(["--json", "--no-discover", "--no-cache", "--arch", "80,90", "--cu", str(tmp_path / "toy.cu"),
              "--cu", str(tmp_path / "toy_broken.cu")], timeout=900)
    rows = _rows(p)
    assert p.returncode == 1, p.stderr[-3000:]
    for arch in (80, 90):
        spill = _one(rows, "toy_spill", arch)
        assert spill["kind"] == "cuda" and spill["status"] == "FAIL" and spill["registers"] <= 32
        assert spill["spill_store_bytes"] > 0 and spill["spill_load_bytes"] > 0 and spill["stack_bytes"] > 0
        clean = _one(rows, "toy_clean", arch)
        assert clean["status"] == "ok" and clean["stack_bytes"] == 0 and clean["shared_bytes"] >= 1024, clean
        wmma = _one(rows, "toy_wmma", arch)
        assert wmma["status"] == "ok" and wmma["mma"] > 0, wmma
        broken = _one(rows, "<nvcc>", arch, "toy_broken.cu")
        assert broken["status"] == "FAIL" and "undefined_name" in broken["problems"][0]


@needs_nvcc
def test_ptxas_and_cuobjdump_parsers_agree(tmp_path):
    """The two reports of the same object, parsed independently, give the same numbers."""
    cu = tmp_path / "toy.cu"
    cu.write_text(TOY_CU)
    obj = tmp_path / "toy.o"
    p = subprocess.run(["nvcc", "-c", "-O3", "-arch=sm_80", "-Xptxas", "-v", str(cu), "-o", str(obj)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    ptx = aot.parse_ptxas(p.stdout + p.stderr)
    cuobjdump = aot.find_tool("cuobjdump")
    usage = aot.parse_resource_usage(subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)],
                                                    capture_output=True, text=True, check=True).stdout)
    mma = aot.count_mma(subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True,
                                       check=True).stdout)
    assert len(ptx) == 3 and set(ptx) == set(usage) == set(mma)
    for sym, k in ptx.items():
        assert k["arch"] == 80
        assert (k["registers"], k["stack"], k["shared"]) == (usage[sym]["REG"], usage[sym]["STACK"],
                                                            usage[sym]["SHARED"]), (sym, k, usage[sym])
    by = {next(n for n in ("toy_spill", "toy_clean", "toy_wmma") if n in s): s for s in ptx}
    assert ptx[by["toy_spill"]]["spill_stores"] > 0 and ptx[by["toy_clean"]]["spill_stores"] == 0
    assert ptx[by["toy_clean"]]["shared"] == 256 * 4
    assert mma[by["toy_wmma"]] > 0 and mma[by["toy_clean"]] == 0


# ---------------------------------------------------------------------------------------------
# The project's kernels
# ---------------------------------------------------------------------------------------------
@needs_nvcc
def test_project_kernels_compile_clean():
    """Every scm_kernels/<op>/triton_kernels.py:AOT_SPECS entry and every csrc/cuda/*.cu compiles for
    sm_80 and sm_90 without spills, within shared memory, with MMA where expected: exit status 0.
    (Uses the content-keyed cache: a cached row is the result for exactly these sources.)"""
    import importlib

    p = _aot(["--json"])
    rows = _rows(p)
    failed = [f"{r['op']} {r['kernel']} sm_{r['arch']} [{r['config']}]: {r['problems']}" for r in rows
              if r["status"] != "ok"]
    assert not failed and p.returncode == 0, "\n".join(failed) + "\n" + p.stderr[-2000:]
    for r in rows:
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0 and not r["spill_store_bytes"], r
    ops = sorted(d.name for d in (REPO / "scm_kernels").iterdir() if (d / "triton_kernels.py").is_file())
    for op in ops:
        specs = importlib.import_module(f"scm_kernels.{op}.triton_kernels").AOT_SPECS
        for arch in (80, 90):
            n_specs = sum(s.archs is None or arch in s.archs for s in specs)
            got = [r for r in rows if r["kind"] == "triton" and r["op"] == op and r["arch"] == arch]
            assert len(got) == n_specs, f"{op} sm_{arch}: {len(got)} rows for {n_specs} AOT_SPECS"
    for cu in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        for arch in (80, 90):
            got = [r for r in rows if r["kind"] == "cuda" and r["config"] == cu.name and r["arch"] == arch]
            assert got and all(r["kernel"] != "<nvcc>" for r in got), f"{cu.name} sm_{arch}: {got}"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input():
    for args, match in ((["--arch", "75"], "--arch must be among"), (["--arch", "x"], "comma-separated integers"),
                        (["--ops", "no_such_op"], r"--ops: unknown op\(s\) \['no_such_op'\]"),
                        (["--cu", "/nonexistent.cu"], "--cu: no such file"), (["--jobs", "0"], "--jobs must be")):
        p = _aot(args, timeout=120)
        assert p.returncode == 2 and match.replace("\\", "") in p.stderr.replace("\\", ""), (args, p.stderr)
    with pytest.raises(ValueError, match=r"archs must be among \[80, 90\], got \[75\]"):
        aot.run([], [75])
    rows = aot.run(["not a spec"], [80], jobs=1, cache_dir=None)
    assert len(rows) == 1 and rows[0]["status"] == "FAIL"
    assert rows[0]["problems"] == ["AOT_SPECS entries must be KernelSpec (scm_kernels.aot.spec), got str"]
    if os.environ.get("TRITON_INTERPRET"):
        # Under the interpreter (this process, without a GPU) @triton.jit makes interpreted functions:
        # run() reports that as a failed row with the way out, it does not crash.
        import triton
        import triton.language as tl

        @triton.jit
        def interp(X, BLOCK: tl.constexpr):
            tl.store(X + tl.arange(0, BLOCK), 1.0)

        s = aot.spec("toy", interp, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16})
        (row,) = aot.run([s], [80], jobs=1, cache_dir=None)
        assert row["status"] == "FAIL" and row["kernel"] == "interp"
        assert "fn must be a @triton.jit function" in row["problems"][0]
        assert "TRITON_INTERPRET is set" in row["problems"][0]
    assert aot.parse_ptxas("") == {} and aot.parse_resource_usage("") == {} and aot.count_mma("") == {}
