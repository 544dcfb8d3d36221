"""Static tier: ahead-of-time compilation of every launchable kernel for sm_80 and sm_90.

    python -m scm_kernels.aot [--json] [--ops a,b] [--arch 80,90] [--jobs N] [--no-cache]

No GPU is needed (see shared/docs/no-gpu.md, section 2):

* Triton: every `KernelSpec` in `scm_kernels/<op>/triton_kernels.py:AOT_SPECS` (one per
  configuration the launchers can run) is compiled with `triton.compile(ASTSource(...),
  target=GPUTarget("cuda", arch, 32), options={num_warps, num_stages})`. The cubin goes through
  `cuobjdump --dump-resource-usage` (REG, STACK, SHARED, LOCAL per function) and `--dump-sass`
  (tensor-core instructions: HMMA on sm_80, HGMMA or HMMA on sm_90). Shared memory is the static
  SHARED of the cubin plus Triton's dynamic `metadata.shared`.
* CUDA C++: every `csrc/cuda/*.cu` is compiled with `nvcc -c -O3 -arch=sm_NN -Xptxas -v` against
  torch's headers with the flags torch's CUDAExtension uses; ptxas's report gives registers, stack
  frame, spill stores/loads and static shared memory per kernel, cuobjdump the LOCAL bytes and SASS.
  (Dynamic shared memory of a .cu kernel is a launch argument and cannot be seen here.)

A row fails on: compile error; spills (STACK > 0, LOCAL > 0 or ptxas spill stores/loads > 0);
shared memory over the architecture's per-block opt-in limit (SHARED_LIMIT); a Triton block that
needs more than 64K registers; `expects_mma=True` without a tensor-core instruction in the SASS.
Besides, each Triton kernel goes through the front end with its integer arguments equal to 1 (what
Triton specializes at run time; see `ones_specialization_failures`): a failure is a row too.
The exit status is 1 when any row fails, 0 otherwise.

Function API: `run(specs, archs, cu_files=...) -> rows` (list of dicts, the `--json` rows);
`discover(ops)`; `main(argv) -> exit status`. The parsers `parse_resource_usage`, `parse_ptxas`
and `count_mma` take the tools' text output.

Compiled results are cached by content hash (Triton: the kernel's source hash with its
dependencies, constexprs, signature, options, triton version; CUDA: the .cu file, csrc/include and
the other files of csrc/cuda, the flags, the nvcc and torch versions) in $SCM_AOT_CACHE or
~/.cache/scm_kernels/aot, so that a repeated run only compiles what changed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from pathlib import Path


from scm_kernels._spec import KernelSpec, spec  # noqa: E402,F401  (the API op modules build AOT_SPECS with)


# ---------------------------------------------------------------------------------------------
# Limits and locations
# ---------------------------------------------------------------------------------------------
ARCHS = (80, 90)
# Opt-in maximum shared memory per block (cudaFuncAttributeMaxDynamicSharedMemorySize):
# A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
REGISTERS_PER_BLOCK = 65536  # 64K 32-bit registers per block on sm_80 and sm_90
REGISTER_GRANULE = 8  # registers are allocated per thread in multiples of 8 (256 per warp)
MMA_OPCODES = {80: ("HMMA",), 90: ("HGMMA", "HMMA")}

_PKG = Path(__file__).resolve().parent
_ROOT = _PKG.parent
CUDA_DIR = _ROOT / "csrc" / "cuda"
INCLUDE_DIR = _ROOT / "csrc" / "include"
_CACHE_VERSION = "1"  # bump when the cached measurement format changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCM_AOT_CACHE") or Path.home() / ".cache" / "scm_kernels" / "aot")


def find_tool(name: str) -> str | None:
    """cuobjdump/nvdisasm: the copy in the triton wheel first, then PATH, then $CUDA_HOME/bin."""
    spec_ = importlib.util.find_spec("triton")
    candidates = []
    if spec_ is not None and spec_.submodule_search_locations:
        candidates.append(Path(list(spec_.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / name)
    which = shutil.which(name)
    if which:
        candidates.append(Path(which))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


# ---------------------------------------------------------------------------------------------
# Parsers of the tools' text output
# ---------------------------------------------------------------------------------------------
_ARCH_RE = re.compile(r"arch\s*=\s*sm_(\d+)")
_FUNC_RE = re.compile(r"^\s*Function\s+([^\s:]+)\s*:\s*$")
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict:
    """`cuobjdump --dump-resource-usage` -> {function: {"arch", "REG", "STACK", "SHARED", "LOCAL", ...}}.

    A fat binary lists one section per architecture ("arch = sm_80"); a bare cubin has no header
    (arch None). Keys are (arch, name) only when several architectures are present, else name."""
    out: dict = {}
    arch = None
    current = None
    archs_seen = set()
    for line in text.splitlines():
        m = _ARCH_RE.search(line)
        if m:
            arch = int(m.group(1))
            archs_seen.add(arch)
            continue
        m = _FUNC_RE.match(line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            fields = {k: int(v) for k, v in _FIELD_RE.findall(line)}
            fields["arch"] = arch
            out[(arch, current)] = fields
            current = None
    if len(archs_seen) <= 1:
        return {name: v for (_, name), v in out.items()}
    return out


_SASS_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_SASS_ARCH_RE = re.compile(r"(?:code for|arch\s*=)\s*sm_(\d+)")
_OPCODE_RE = re.compile(r"/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)(?:\.[A-Za-z0-9_.]*)?")


def count_mma(sass: str, opcodes: tuple[str, ...] = ("HMMA", "HGMMA")) -> dict:
    """`cuobjdump --dump-sass` -> {function: number of tensor-core instructions among `opcodes`}."""
    counts: dict = {}
    current = None
    for line in sass.splitlines():
        m = _SASS_FUNC_RE.match(line)
        if m:
            current = m.group(1)
            counts.setdefault(current, 0)
            continue
        if current is None:
            continue
        m = _OPCODE_RE.search(line)
        if m and m.group(1) in opcodes:
            counts[current] += 1
    return counts


_PTXAS_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PTXAS_PROPS_RE = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED_RE = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict:
    """`nvcc -Xptxas -v` output -> {mangled kernel: {"arch", "registers", "stack", "spill_stores",
    "spill_loads", "shared"}} for every entry function (device functions are not rows)."""
    kernels: dict = {}
    entry = None
    props_of = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY_RE.search(line)
        if m:
            entry = m.group(1)
            kernels[entry] = dict(arch=int(m.group(2)), registers=None, stack=0, spill_stores=0,
                                  spill_loads=0, shared=0)
            props_of = None
            continue
        m = _PTXAS_PROPS_RE.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _PTXAS_STACK_RE.search(line)
        if m and props_of is not None:
            if props_of in kernels:
                k = kernels[props_of]
                k["stack"], k["spill_stores"], k["spill_loads"] = (int(g) for g in m.groups())
            props_of = None
            continue
        m = _PTXAS_USED_RE.search(line)
        if m and entry is not None:
            kernels[entry]["registers"] = int(m.group(1))
            s = _PTXAS_SMEM_RE.search(line)
            kernels[entry]["shared"] = int(s.group(1)) if s else 0
    return kernels


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def _row(kind: str, op: str, kernel: str, arch, config: str, **kw) -> dict:
    r = dict(kind=kind, op=op, kernel=kernel, arch=arch, config=config, registers=None, stack_bytes=None,
             local_bytes=None, ptx_local_bytes=None, spill_store_bytes=None, spill_load_bytes=None, shared_bytes=None,
             shared_limit=SHARED_LIMIT.get(arch), mma=None, expects_mma=False, num_warps=None,
             symbol=None, error=None, cached=False, seconds=0.0)
    r.update(kw)
    return r


def _failed(kind: str, op: str, kernel: str, arch, config: str, error: str) -> dict:
    return judge(_row(kind, op, kernel, arch, config, error=error))


def judge(row: dict) -> dict:
    """Set row["problems"] (list of reasons) and row["status"] ("ok" or "FAIL") from the measurements."""
    problems = []
    if row.get("error"):
        problems.append(row["error"])
    else:
        spill = {k: row.get(k) or 0 for k in ("stack_bytes", "local_bytes", "spill_store_bytes",
                                                "spill_load_bytes")}
        if any(spill.values()):
            note = ""
            if row.get("ptx_local_bytes"):
                note = (f" (the PTX itself declares a {row['ptx_local_bytes']} B local array, e.g. the "
                        "slow path of precise sin/cos)")
            problems.append("spills: " + ", ".join(f"{k.replace('_bytes', '')} {v} B"
                                                   for k, v in spill.items() if v) + note)
        limit = SHARED_LIMIT.get(row["arch"])
        if row.get("shared_bytes") is not None and limit is not None and row["shared_bytes"] > limit:
            problems.append(f"shared memory {row['shared_bytes']} B > sm_{row['arch']} limit {limit} B")
        if row.get("num_warps") and row.get("registers") is not None:
            per_thread = -(-row["registers"] // REGISTER_GRANULE) * REGISTER_GRANULE
            need = per_thread * 32 * row["num_warps"]
            if need > REGISTERS_PER_BLOCK:
                problems.append(f"{row['registers']} registers x {32 * row['num_warps']} threads = {need} "
                                f"> {REGISTERS_PER_BLOCK} registers per block")
        if row.get("expects_mma") and not row.get("mma"):
            problems.append("expects tensor-core instructions ("
                            + "/".join(MMA_OPCODES.get(row["arch"], ("HMMA",))) + ") but the SASS has none")
    row["problems"] = problems
    row["status"] = "FAIL" if problems else "ok"
    return row


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def _cache_get(cache_dir, key: str):
    if cache_dir is None:
        return None
    p = Path(cache_dir) / f"{key}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _cache_put(cache_dir, key: str, value) -> None:
    if cache_dir is None:
        return
    d = Path(cache_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        pass  # a read-only or full cache only costs time


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _tool(args: list, what: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
    return p.stdout


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
def _jit_function(fn):
    """The JITFunction under `fn` (unwrapping triton.autotune / heuristics), or a TypeError."""
    from triton.runtime.jit import JITFunction

    seen = fn
    for _ in range(8):
        if isinstance(fn, JITFunction):
            return fn
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    hint = (" (TRITON_INTERPRET is set in this process, so @triton.jit made an interpreted function: run "
            "`python -m scm_kernels.aot`, which re-executes itself without it)"
            if "TRITON_INTERPRET" in os.environ else "")
    raise TypeError(f"fn must be a @triton.jit function, got {type(seen).__module__}.{type(seen).__name__}{hint}")


def _check_spec(s: KernelSpec, fn) -> None:
    """Signature/constexprs consistent with the kernel's arguments (ValueError naming the mismatch)."""
    args = list(fn.arg_names)
    missing = [a for a in args if a not in s.signature]
    extra = [a for a in s.signature if a not in args]
    if missing or extra:
        raise ValueError(f"signature must name every argument of {fn.__name__}{tuple(args)}: "
                         f"missing {missing}, unknown {extra}")
    ce_args = [a for a in args if s.signature[a] == "constexpr"]
    no_value = [a for a in ce_args if a not in s.constexprs]
    not_ce = [a for a in s.constexprs if a not in ce_args]
    if no_value or not_ce:
        raise ValueError(f"constexprs must give a value to exactly the 'constexpr' arguments {ce_args}: "
                         f"without value {no_value}, not constexpr in the signature {not_ce}")
    if not (isinstance(s.num_warps, int) and s.num_warps >= 1 and s.num_warps & (s.num_warps - 1) == 0):
        raise ValueError(f"num_warps must be a power of two >= 1, got {s.num_warps!r}")
    if not (isinstance(s.num_stages, int) and s.num_stages >= 1):
        raise ValueError(f"num_stages must be an int >= 1, got {s.num_stages!r}")


def compile_triton(s: KernelSpec, arch: int) -> dict:
    """Compile one spec for sm_`arch` and measure it: {"cubin": bytes, "shared": dynamic bytes, "name"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(s.fn)
    _check_spec(s, fn)
    src = ASTSource(fn=fn, signature=dict(s.signature), constexprs=dict(s.constexprs))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": s.num_warps, "num_stages": s.num_stages})
    return {"cubin": k.asm["cubin"], "shared": int(k.metadata.shared), "name": k.metadata.name,
            "ptx_local": ptx_local_bytes(k.asm["ptx"])}


def ptx_local_bytes(ptx: str) -> int:
    """Bytes of local arrays the PTX itself declares (`.local ... __local_depotN[n]`): per-thread
    arrays such as the Payne-Hanek table of precise sin/cos, as opposed to spills added by ptxas."""
    return sum(int(n) for n in re.findall(r"\.local\s[^;]*__local_depot\d+\[(\d+)\]", ptx))


def _triton_key(s: KernelSpec, arch: int) -> str:
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(fn=_jit_function(s.fn), signature=dict(s.signature), constexprs=dict(s.constexprs))
    return _sha("triton", _CACHE_VERSION, triton.__version__, src.hash(), arch, s.num_warps, s.num_stages)


def _measure_triton(s: KernelSpec, arch: int, cache_dir) -> dict:
    key = _triton_key(s, arch)
    hit = _cache_get(cache_dir, key)
    if hit is not None:
        return dict(hit, cached=True)
    art = compile_triton(s, arch)
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (looked in triton/backends/nvidia/bin, PATH, $CUDA_HOME/bin)")
    with tempfile.TemporaryDirectory(prefix="scm_aot_") as d:
        path = os.path.join(d, f"{art['name']}.sm_{arch}.cubin")
        with open(path, "wb") as f:
            f.write(art["cubin"])
        usage = parse_resource_usage(_tool([cuobjdump, "--dump-resource-usage", path], "cuobjdump"))
        mma = count_mma(_tool([cuobjdump, "--dump-sass", path], "cuobjdump --dump-sass"), MMA_OPCODES[arch])
    if art["name"] not in usage:
        raise RuntimeError(f"cuobjdump reports no function {art['name']!r} (found {sorted(usage)})")
    u = usage[art["name"]]
    m = dict(registers=u["REG"], stack_bytes=u["STACK"], local_bytes=u["LOCAL"],
             shared_bytes=u["SHARED"] + art["shared"], mma=mma.get(art["name"], 0), symbol=art["name"],
             ptx_local_bytes=art["ptx_local"])
    _cache_put(cache_dir, key, m)
    return m


_TASK_SPECS: list = []  # specs of the current run(), inherited by forked workers


def _triton_task(index: int, arch: int, cache_dir) -> list:
    s = _TASK_SPECS[index]
    t0 = time.perf_counter()
    base = dict(expects_mma=s.expects_mma, num_warps=s.num_warps)
    try:
        m = _measure_triton(s, arch, cache_dir)
    except Exception as e:  # a compile error is a failed row, never a crash of the whole report
        return [_failed("triton", s.op, _safe_name(s), arch, _safe_config(s), _describe(e)) | base
                | {"seconds": time.perf_counter() - t0}]
    return [judge(_row("triton", s.op, s.kernel_name, arch, s.config, **base, **m,
                       seconds=time.perf_counter() - t0))]


def _safe_name(s) -> str:
    try:
        return s.kernel_name
    except Exception:
        return repr(s.fn)


def _safe_config(s) -> str:
    try:
        return s.config
    except Exception:
        return "?"


def _describe(e: BaseException, lines: int = 25) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    parts = text.splitlines()
    if len(parts) > lines:
        parts = parts[:lines] + [f"... ({len(parts) - lines} more lines)"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# CUDA C++
# ---------------------------------------------------------------------------------------------
def nvcc_command(cu: Path, arch: int, out: Path) -> list:
    """The compile-only command for one .cu file: torch's CUDAExtension flags, csrc/include, torch's
    and Python's headers, SCM_WITH_CUDA=1, ptxas -v for the resource report."""
    from torch.utils import cpp_extension as ce

    import torch

    nvcc = shutil.which("nvcc") or (os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None)
    if nvcc is None or not os.path.exists(nvcc):
        raise RuntimeError("nvcc not found on PATH nor in $CUDA_HOME/bin")
    incs = list(ce.include_paths()) + [sysconfig.get_paths()["include"]]
    flags = ["-DSCM_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    # The CPU wheel of torch ships c10/cuda headers without the cmake-generated config header;
    # it only defines export macros, so a compile-only check may skip it.
    if not any(os.path.exists(os.path.join(i, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for i in incs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [nvcc, "-c", "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", f"-arch=sm_{arch}",
            "-Xptxas", "-v", "-Xcompiler", "-fPIC", *ce.COMMON_NVCC_FLAGS, *flags,
            f"-I{INCLUDE_DIR}", *(f"-I{i}" for i in incs), str(cu), "-o", str(out)]


def _demangle(names: list) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    p = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = p.stdout.splitlines() if p.returncode == 0 else names
    if len(out) != len(names):
        out = names
    return {n: _kernel_name(d) for n, d in zip(names, out)}


def _kernel_name(demangled: str) -> str:
    """'void scm::(anonymous namespace)::k<float, 4>(float const*, int)' -> 'scm::(anon)::k<float, 4>'."""
    d = demangled.strip()
    if d.endswith(")"):  # drop the parameter list: the '(' that matches the final ')'
        depth = 0
        for i in range(len(d) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(d[i], 0)
            if depth == 0:
                d = d[:i]
                break
    d = d.replace("(anonymous namespace)", "(anon)")
    return d[5:] if d.startswith("void ") else d


def _tree_bytes(*dirs: Path, skip=None) -> list:
    parts = []
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.is_file() and p != skip and p.suffix != ".cu":
                    parts += [str(p.relative_to(d)).encode(), p.read_bytes()]
    return parts


def _cuda_key(cu: Path, arch: int) -> str:
    import torch

    cmd = nvcc_command(cu, arch, Path("OUT"))
    version = _tool([cmd[0], "--version"], "nvcc --version")
    flags = [c for c in cmd[1:] if c != str(cu)]
    return _sha("cuda", _CACHE_VERSION, version, torch.__version__, flags, arch, cu.read_bytes(),
                *_tree_bytes(INCLUDE_DIR, cu.parent))


def _cuda_task(cu: str, arch: int, cache_dir) -> list:
    cu = Path(cu)
    op = cu.stem
    t0 = time.perf_counter()
    try:
        key = _cuda_key(cu, arch)
        hit = _cache_get(cache_dir, key)
        cached = hit is not None
        if hit is None:
            hit = _measure_cuda(cu, arch)
            if "error" not in hit:
                _cache_put(cache_dir, key, hit)
    except Exception as e:
        return [_failed("cuda", op, "<nvcc>", arch, cu.name, _describe(e)) | {"seconds": time.perf_counter() - t0}]
    dt = time.perf_counter() - t0
    if "error" in hit:
        return [_failed("cuda", op, "<nvcc>", arch, cu.name, hit["error"]) | {"seconds": dt}]
    if not hit["kernels"]:
        return [_failed("cuda", op, "<nvcc>", arch, cu.name,
                        f"ptxas reported no kernel for sm_{arch} (no __global__ function compiled?)")
                | {"seconds": dt}]
    rows = []
    for k in hit["kernels"]:
        rows.append(judge(_row("cuda", op, k["name"], arch, cu.name, registers=k["registers"],
                               stack_bytes=k["stack"], local_bytes=k["local"], spill_store_bytes=k["spill_stores"],
                               spill_load_bytes=k["spill_loads"], shared_bytes=k["shared"], mma=k["mma"],
                               symbol=k["symbol"], cached=cached, seconds=dt / len(hit["kernels"]))))
    return rows


def _measure_cuda(cu: Path, arch: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="scm_aot_") as d:
        obj = Path(d) / f"{cu.stem}.sm_{arch}.o"
        p = subprocess.run(nvcc_command(cu, arch, obj), capture_output=True, text=True)
        log = p.stdout + p.stderr
        if p.returncode != 0:
            errs = [ln for ln in log.splitlines() if "error" in ln.lower()] or log.splitlines()
            return {"error": f"nvcc failed (exit {p.returncode}):\n" + "\n".join(errs[:25])}
        ptx = {n: v for n, v in parse_ptxas(log).items() if v["arch"] == arch}
        cuobjdump = find_tool("cuobjdump")
        if cuobjdump is None:
            raise RuntimeError("cuobjdump not found (looked in triton/backends/nvidia/bin, PATH, $CUDA_HOME/bin)")
        usage = parse_resource_usage(_tool([cuobjdump, "--dump-resource-usage", str(obj)], "cuobjdump"))
        mma = count_mma(_tool([cuobjdump, "--dump-sass", str(obj)], "cuobjdump --dump-sass"), MMA_OPCODES[arch])
    names = _demangle(sorted(ptx))
    kernels = []
    for sym in sorted(ptx):
        v = ptx[sym]
        u = usage.get(sym) or usage.get((arch, sym)) or {}
        kernels.append(dict(name=names[sym], symbol=sym, registers=v["registers"], stack=max(v["stack"], u.get("STACK", 0)),
                            local=u.get("LOCAL", 0), spill_stores=v["spill_stores"], spill_loads=v["spill_loads"],
                            shared=max(v["shared"], u.get("SHARED", 0)), mma=mma.get(sym, 0)))
    return {"kernels": kernels}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _call(task):
    fn, args = task
    try:
        return fn(*args)
    except Exception as e:  # the tasks catch their own errors; this is the last line of defence
        return [_failed("?", "?", "<task>", None, "", f"internal error: {_describe(e)}\n{traceback.format_exc()}")]


def run(specs=(), archs=ARCHS, *, cu_files=(), jobs: int | None = None, cache_dir="default") -> list:
    """Compile `specs` (KernelSpecs) and `cu_files` (paths of .cu files) for every arch in `archs`.

    Returns one row per (spec, arch) and per (CUDA kernel, arch), failed rows included (a spec that
    is not a KernelSpec, a compile error); see `judge` for what fails. `jobs` worker processes
    (default: the CPU count); `cache_dir` None disables the cache, "default" is default_cache_dir()."""
    archs = [int(a) for a in archs]
    bad = [a for a in archs if a not in SHARED_LIMIT]
    if bad:
        raise ValueError(f"archs must be among {sorted(SHARED_LIMIT)}, got {bad}")
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    cache_dir = None if cache_dir is None else str(cache_dir)
    rows, tasks = [], []
    for f in cu_files:  # the longest tasks first
        for a in archs:
            tasks.append((_cuda_task, (str(f), a, cache_dir)))
    global _TASK_SPECS
    _TASK_SPECS = []
    for s in specs:
        if not isinstance(s, KernelSpec):
            rows.append(_failed("triton", "?", "<spec>", None, "",
                                f"AOT_SPECS entries must be KernelSpec (scm_kernels.aot.spec), got {type(s).__name__}"))
            continue
        _TASK_SPECS.append(s)
        for a in archs:
            if s.archs is None or a in s.archs:  # a config that only one architecture launches
                tasks.append((_triton_task, (len(_TASK_SPECS) - 1, a, cache_dir)))
    if tasks and any(t[0] is _triton_task for t in tasks):
        import triton  # noqa: F401  (imported once here, inherited by the forked workers)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks) or 1))
    if jobs == 1 or "fork" not in multiprocessing.get_all_start_methods():
        results = [_call(t) for t in tasks]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(_call, tasks))
    for r in results:
        rows.extend(r)
    rows.sort(key=lambda r: (r["kind"] != "triton", r["op"], r["kernel"], r["config"], r["arch"] or 0))
    return rows


def ones_specialization_failures(specs, arch: int = 90) -> list:
    """Failed rows for kernels whose front end breaks when an integer argument equals 1.

    At run time Triton turns an int argument equal to 1 into the constant 1 (a Python int inside the
    kernel), so `(a * b).to(tl.float32)` works for every size but 1 ("'int' object has no attribute
    'to'"; `tl.cast` takes both). The compiled specs never see this: their ints are runtime values.
    Here every distinct (kernel, constexprs) of `specs` goes through the front end (Python AST to
    TTIR, no ptxas) with all its i32/i64 arguments set to 1, except those the kernel lists in
    `do_not_specialize`. Python ints are the only new kind of value, and all-ones makes the most of them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    failed, seen, done = [], set(), set()
    for s in specs:
        if not isinstance(s, KernelSpec):
            continue
        fn = _jit_function(s.fn)
        key = (id(fn), tuple(sorted((k, repr(v)) for k, v in s.constexprs.items())))
        if key in seen or fn.__name__ in done:
            continue
        seen.add(key)
        dns = getattr(fn, "do_not_specialize", None) or ()
        keep = {fn.arg_names[a] if isinstance(a, int) else a for a in dns}
        sig, ce = dict(s.signature), dict(s.constexprs)
        for a, t in s.signature.items():
            if t in ("i32", "i64") and a not in keep:
                sig[a], ce[a] = "constexpr", 1
        opts = backend.parse_options({"num_warps": s.num_warps, "num_stages": s.num_stages})
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        try:
            ASTSource(fn=fn, signature=sig, constexprs=ce).make_ir(
                target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
        except Exception as e:
            done.add(fn.__name__)  # one row per kernel
            failed.append(_failed("triton", s.op, s.kernel_name, None, "int arguments = 1 (run-time "
                                  "specialization)", _describe(e)))
    return failed


def _op_modules() -> dict:
    return {d.name: f"scm_kernels.{d.name}.triton_kernels"
            for d in sorted(_PKG.iterdir()) if (d / "triton_kernels.py").is_file()}


def _load_specs(module: str, op: str) -> tuple[list, list]:
    """(specs, failed rows) of one module's AOT_SPECS; import errors become failed rows."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        return [], [_failed("triton", op, "<import>", None, module, f"cannot import {module}: {_describe(e)}")]
    specs = getattr(mod, "AOT_SPECS", None)
    if not isinstance(specs, (list, tuple)) or not specs:
        return [], [_failed("triton", op, "<AOT_SPECS>", None, module,
                            f"{module} must define AOT_SPECS, a non-empty list of scm_kernels.aot.spec(...), "
                            f"got {type(specs).__name__ if specs is not None else 'nothing'}")]
    return list(specs), []


def discover(ops=None, *, modules=(), triton: bool = True, cuda: bool = True) -> tuple[list, list, list]:
    """(specs, failed rows, .cu files): AOT_SPECS of every scm_kernels/<op>/triton_kernels.py and
    every csrc/cuda/<op>.cu (restricted to `ops` when given), plus those of the extra `modules`."""
    specs, failed, cu_files = [], [], []
    if triton:
        for op, module in _op_modules().items():
            if ops is None or op in ops:
                s, f = _load_specs(module, op)
                specs += s
                failed += f
    for module in modules:
        s, f = _load_specs(module, module)
        specs += s
        failed += f
    if cuda and CUDA_DIR.is_dir():
        cu_files = [p for p in sorted(CUDA_DIR.glob("*.cu")) if ops is None or p.stem in ops]
    return specs, failed, cu_files


def format_table(rows: list) -> str:
    head = ("op", "kernel", "arch", "config", "regs", "spills stack/local B", "shared B", "mma", "status")
    body = []
    for r in rows:
        arch = f"sm_{r['arch']}" if r["arch"] else "-"
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        spills = "-" if r["stack_bytes"] is None else f"{r['stack_bytes']}/{r['local_bytes']}"
        if r.get("spill_store_bytes"):
            spills += f" (st {r['spill_store_bytes']}, ld {r['spill_load_bytes']})"
        status = r["status"] if r["status"] == "ok" else "FAIL: " + r["problems"][0].splitlines()[0][:70]
        body.append((r["op"], r["kernel"], arch, r["config"], fmt(r["registers"]), spills,
                     fmt(r["shared_bytes"]), fmt(r["mma"]) + ("*" if r.get("expects_mma") else ""), status))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def summary(rows: list, seconds: float) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("triton", "cuda")}
    reasons = {}
    for r in failed:
        for p in r["problems"]:
            key = p.split(":")[0].split(" ")[0] if not p.startswith("shared") else "shared"
            reasons[key] = reasons.get(key, 0) + 1
    why = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items()))
    return (f"scm_kernels.aot: {len(rows)} rows ({kinds['triton']} Triton, {kinds['cuda']} CUDA), "
            f"{len(failed)} failed{f' ({why})' if why else ''}, "
            f"{sum(r['cached'] for r in rows)} from cache, {seconds:.1f}s")


def _csv(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TRITON_INTERPRET" in os.environ:
        # @triton.jit gives interpreted functions under TRITON_INTERPRET: compile in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "scm_kernels.aot", *argv], env=env).returncode
    p = argparse.ArgumentParser(prog="python -m scm_kernels.aot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list (summary on stderr)")
    p.add_argument("--ops", type=_csv, default=None, help="comma-separated ops (Triton module or .cu stem)")
    p.add_argument("--arch", type=_csv, default=[str(a) for a in ARCHS], help="comma-separated: 80,90")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--no-cache", action="store_true", help="compile everything (ignore and do not fill the cache)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default $SCM_AOT_CACHE or "
                   "~/.cache/scm_kernels/aot)")
    p.add_argument("--module", action="append", default=[], help="also compile AOT_SPECS of this module")
    p.add_argument("--cu", action="append", default=[], help="also compile this .cu file")
    p.add_argument("--no-discover", action="store_true", help="only --module/--cu, not the project's kernels")
    p.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda/*.cu")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch]
    except ValueError:
        p.error(f"--arch must be comma-separated integers among {list(ARCHS)}, got {','.join(args.arch)}")
    if not archs or any(a not in SHARED_LIMIT for a in archs):
        p.error(f"--arch must be among {list(ARCHS)}, got {','.join(args.arch)}")
    ops = set(args.ops) if args.ops is not None else None
    if ops is not None:
        known = set(_op_modules()) | ({c.stem for c in CUDA_DIR.glob("*.cu")} if CUDA_DIR.is_dir() else set())
        unknown = sorted(ops - known)
        if unknown:
            p.error(f"--ops: unknown op(s) {unknown}; known: {sorted(known)}")
    for cu in args.cu:
        if not Path(cu).is_file():
            p.error(f"--cu: no such file {cu}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")

    t0 = time.perf_counter()
    if args.no_discover:
        specs, failed, cu_files = discover(set(), modules=args.module, triton=False, cuda=False)
    else:
        specs, failed, cu_files = discover(ops, modules=args.module, cuda=not args.no_cuda)
        if not args.no_cuda and not CUDA_DIR.is_dir():
            print(f"scm_kernels.aot: {CUDA_DIR} not found (not a source checkout): no CUDA files", file=sys.stderr)
    cu_files = list(cu_files) + [Path(c) for c in args.cu]
    cache_dir = None if args.no_cache else (args.cache_dir or "default")
    rows = run(specs, archs, cu_files=cu_files, jobs=args.jobs, cache_dir=cache_dir)
    if specs:
        failed += ones_specialization_failures(specs)
    rows = sorted(failed + rows, key=lambda r: (r["kind"] != "triton", r["op"], r["kernel"], r["config"],
                                                 r["arch"] or 0))
    line = summary(rows, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(rows, indent=1))
        print(line, file=sys.stderr)
    else:
        print(format_table(rows) if rows else "(no kernels found)")
        for r in rows:
            if r["status"] != "ok":
                arch = f"sm_{r['arch']}" if r["arch"] else "-"
                print(f"\nFAIL {r['op']} {r['kernel']} {arch} [{r['config']}]:")
                for prob in r["problems"]:
                    print("  " + prob.replace("\n", "\n  "))
        print("\n" + line)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module: use the importable one so
    # that KernelSpec (what the op modules build with scm_kernels.aot.spec) is one class.
    from scm_kernels import aot as _aot

    sys.exit(_aot.main())
