"""The common benchmark harness of scm_kernels: cases, providers, modes, timers, memory, CSV rows.

One op = one file `benchmarks/bench_<op>.py` that declares `OP`, `TARGETS` and `cases(device, quick)`
returning a list of `Case` (shape, dtype, modes, input factory, byte/FLOP formulas, the op's public
function and its eager reference). Everything else lives here, written once:

Providers (one row each per case and mode)
  scm           the op's public function, automatic backend (CPU tensors: the C++ kernels;
                CUDA tensors: Triton)
  scm-<name>    the public function forced onto backend <name> (scm_kernels.use_backend)
  eager         the op's plain-PyTorch reference in the case's dtype (what a user would write)
  compile       torch.compile(reference) (inductor; fullgraph when it can, else noted); its compile
                time is spent in the warm-up, outside the timed region
  copy          bandwidth baseline: `dst.copy_(src)` of a tensor the size of the case's main
                input (`Case.copy_like`), measured in the same run

Modes
  fwd           the forward under torch.no_grad()
  bwd           the backward only: the graph is built ONCE outside the timed region and the timed
                call is torch.autograd.grad(out, inputs, dy, retain_graph=True) for a fixed upstream
                gradient dy (so no forward work is inside the timing)
  fwd+bwd       forward with grad + torch.autograd.grad(out, inputs, dy) (a training step of the op)
  jvp           torch.func.jvp(op, primals, tangents) w.r.t. the case's differentiable inputs
  (op-specific sampling variants such as trigflow_step's denoise / renoise / uint8 are separate
  cases, named by `Case.variant`)

Timers
  CPU   a warm-up call (includes compilation and lazy initialisation), then the number of
        iterations per repeat is doubled until one repeat takes >= min_repeat_ms (~1 ms), then
        `repeats` timed repeats; per-call time of each repeat -> median (p50), p20, p80.
        torch.set_num_threads is left as it is (recorded in the CSV as `threads`).
  CUDA  triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]) (Liger-Kernel style).

Throughput from formulas written in the bench files: GB/s = minimal bytes / time, where minimal
bytes = every input of the mode read once + every output of the mode written once; TFLOP/s where a
FLOP formula is given (compute-bound ops). Peak memory: CUDA max_memory_allocated during one call;
CPU: with `--memory` the peak-RSS increase during one call measured in a fresh subprocess per
(case, provider, mode) (slow), otherwise the analytic bytes of the mode's inputs + outputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MODES = ("fwd", "bwd", "fwd+bwd", "jvp")
BASE_PROVIDERS = ("scm", "eager", "compile", "copy")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"

CSV_COLUMNS = (
    "run_id",
    "timestamp",
    "op",
    "variant",
    "provider",
    "backend",
    "mode",
    "shape",
    "dtype",
    "device",
    "device_name",
    "status",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "iters",
    "repeats",
    "bytes",
    "gbps",
    "flops",
    "tflops",
    "mem_mb",
    "mem_source",
    "x_eager",
    "x_compile",
    "note",
    "threads",
    "load",
    "torch",
    "triton",
    "git_commit",
)

DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.uint8: "uint8",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


class Unavailable(Exception):
    """A provider, mode or op that cannot run here; the message says why (shown in the table)."""


# ---------------------------------------------------------------------------------------------
# Declarations of a bench file
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Baseline:
    """An extra provider of a case. fn(**inputs) -> tensor is its forward (measured like `eager` in
    every mode of `modes`); jvp(primals, tangents) -> (out, tangent), when given, replaces
    torch.func.jvp(fn) in mode jvp (an explicit primal+tangent function). backend: the name shown."""

    fn: Callable[..., torch.Tensor] | None
    modes: tuple[str, ...] = MODES
    jvp: Callable[[tuple, tuple], Any] | None = None
    backend: str = "torch"


@dataclasses.dataclass
class Case:
    """One benchmark case of an op: a shape and dtype, measured in several modes and providers.

    make_inputs(device) -> dict of named tensors (the same seed every call); `scm` and `reference`
    take them as keyword arguments and return one tensor. `diff` names the inputs that carry
    gradients/tangents (bwd, fwd+bwd, jvp). bytes(mode, inputs) -> minimal bytes of that mode;
    flops(mode, inputs) -> FLOPs or None. copy_like names the input whose same-size copy is the
    bandwidth baseline (or a function of the inputs returning such a tensor). baselines: extra
    providers of this case (name -> Baseline), e.g. torch's SDPA under one backend."""

    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    modes: tuple[str, ...]
    make_inputs: Callable[[torch.device], dict[str, torch.Tensor]]
    scm: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    bytes: Callable[[str, dict[str, torch.Tensor]], int]
    diff: tuple[str, ...] = ()
    flops: Callable[[str, dict[str, torch.Tensor]], int | None] | None = None
    copy_like: str | Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    baselines: dict[str, Baseline] = dataclasses.field(default_factory=dict)
    max_repeats: int | None = None  # CPU: cap on the timed repeats (cases whose baselines take seconds)
    # providers that cannot be measured for this case -> why (its row says n/a and the reason), e.g.
    # torch.compile of a whole training step (bench_train_step.py)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)

    def copy_source(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor whose copy is the bandwidth baseline (an input, or one the size of the output)."""
        if self.copy_like is None:
            raise Unavailable("no copy baseline declared for this case")
        return inputs[self.copy_like] if isinstance(self.copy_like, str) else self.copy_like(inputs)

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(
                f"Case {self.op}/{self.variant}: unknown modes {bad}, expected a subset of {MODES}"
            )
        if any(m != "fwd" for m in self.modes) and not self.diff:
            raise ValueError(
                f"Case {self.op}/{self.variant}: modes {self.modes} need `diff` (differentiable inputs)"
            )

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def dtype_str(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def key(self) -> str:
        """Identifies the case inside its op (used by the --memory subprocess)."""
        return f"{self.variant}|{self.shape_str}|{self.dtype_str}"


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance target from the issue, checked on the `scm` provider.

    kind: "x_eager" (eager time / scm time >= threshold), "x_compile" (same against compile),
    "copy_bw" (scm GB/s / copy GB/s >= threshold), "speedup" (time of provider `baseline` in mode
    `baseline_mode` (default: the target's mode) / scm time >= threshold; e.g. 1/1.3 for "within
    1.3x of torch"), or "memory" (peak memory of `baseline` / scm's >= threshold; needs measured
    memory: --memory on CPU). A target applies to every measured case of the op with this variant,
    mode and dtype (and shape, when given)."""

    text: str
    variant: str
    mode: str
    dtype: str
    kind: str
    threshold: float
    shape: str | None = None
    baseline: str = ""
    baseline_mode: str = ""


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the tensors' logical elements (numel * element size; None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.cache
def import_op(op: str) -> tuple[Callable, Callable]:
    """(public function, reference function) of scm_kernels.<op>, or Unavailable saying why."""
    import importlib

    try:
        pkg = importlib.import_module(f"scm_kernels.{op}")
        ref = importlib.import_module(f"scm_kernels.{op}.reference")
    except Exception as e:
        raise Unavailable(f"cannot import scm_kernels.{op}: {type(e).__name__}: {e}") from e
    fn, ref_fn = getattr(pkg, op, None), getattr(ref, op, None)
    if not callable(fn):
        raise Unavailable(f"scm_kernels.{op} has no public function {op}() yet")
    if not callable(ref_fn):
        raise Unavailable(f"scm_kernels.{op}.reference has no function {op}() yet")
    return fn, ref_fn


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
@functools.cache
def git_commit() -> str:
    """`git rev-parse --short HEAD` of the repository, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


@functools.cache
def triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001
        return "none"
    return getattr(triton, "__version__", "unknown")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def load_average() -> float | None:
    """1-minute load average of the machine (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, str]:
    load = load_average()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": str(torch.get_num_threads()),
        "load": "" if load is None else f"{load:.2f}",
        "torch": torch.__version__,
        "triton": triton_version(),
        "git_commit": git_commit(),
    }


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory (mmap and trim thresholds of 1 GiB), for CPU runs.

    PyTorch's CPU allocator is plain malloc: by default a freed multi-MB tensor goes back to the OS
    and the next allocation of that size faults its pages in again, which costs more than the op
    itself at these sizes and hits providers that allocate more temporaries (eager) at random.
    With the thresholds raised, every provider reuses warm memory, as with a caching allocator on
    the GPU, and the ratios measure the kernels. Returns False where this is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    p50: float  # milliseconds per call
    p20: float
    p80: float
    iters: int  # calls per repeat (CPU) or 0 (do_bench)
    repeats: int


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    v = sorted(values)
    if not v:
        raise ValueError("quantile of an empty sequence")
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _calibrate(fn: Callable[[], Any], min_repeat_ms: float) -> int:
    """Calls per repeat: doubled (or extrapolated) until one repeat takes >= min_repeat_ms."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) * 1e3
        if dt >= min_repeat_ms or n >= 1 << 20:
            return n
        n = min(max(2 * n, math.ceil(n * 1.2 * min_repeat_ms / max(dt, 1e-6))), 1 << 20)


def time_cpu_many(
    fns: dict[str, Callable[[], Any]], repeats: int = 25, min_repeat_ms: float = 1.0, warmup: int = 1
) -> dict[str, Timing | Exception]:
    """CPU timer for several callables measured against each other: each gets `warmup` untimed calls
    and its own calls-per-repeat (>= min_repeat_ms per repeat); then the repeats are INTERLEAVED
    (round r times every callable once, the order rotated by one each round), so that load from other
    processes drifting during the run hits every provider alike and the ratios of one run stay fair. Per-call ms of each repeat ->
    median (p50), p20, p80. A callable that raises gets its exception instead of a Timing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    result: dict[str, Timing | Exception] = {}
    iters: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 0)):
                fn()
            iters[name] = _calibrate(fn, min_repeat_ms)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            result[name] = e
    samples: dict[str, list[float]] = {name: [] for name in iters}
    names = list(iters)
    for r in range(repeats):
        # rotating order: no provider always runs right after the same one (a provider that churns
        # gigabytes of memory slows whichever call follows it; that cost is spread over all of them)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], iters[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e3 / n)
    for name, v in samples.items():
        result[name] = Timing(quantile(v, 0.5), quantile(v, 0.2), quantile(v, 0.8), iters[name], repeats)
    return {name: result[name] for name in fns}


def time_cpu(fn: Callable[[], Any], repeats: int = 25, min_repeat_ms: float = 1.0, warmup: int = 1) -> Timing:
    """Median (and p20/p80) per-call time in ms of `repeats` repeats, each running enough calls to
    take >= min_repeat_ms, after `warmup` untimed calls."""
    t = time_cpu_many({"fn": fn}, repeats, min_repeat_ms, warmup)["fn"]
    if isinstance(t, Exception):
        raise t
    return t


def time_cuda(fn: Callable[[], Any], quick: bool = False) -> Timing:
    """triton.testing.do_bench quantiles (p50, p20, p80) in ms."""
    import triton.testing

    warmup, rep = (5, 20) if quick else (25, 100)
    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(p50), float(p20), float(p80), 0, 0)


def cuda_peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak allocated CUDA memory (MB, inputs included) during one call."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) / 1e6


# ---------------------------------------------------------------------------------------------
# Providers x modes -> a callable to time
# ---------------------------------------------------------------------------------------------
def _compile_fn(fn: Callable, note: list[str], backend: str = "inductor") -> Callable:
    """torch.compile(fn), fullgraph when possible; falls back to graph breaks on the first call
    and says so in `note` (never silently: the table shows it)."""
    full = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    state: dict[str, Callable] = {}

    def call(*args, **kwargs):
        f = state.get("fn")
        if f is not None:
            return f(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            out = full(*args, **kwargs)
            state["fn"] = full
        except Exception as e:  # noqa: BLE001 - retried with graph breaks, reported in the note
            partial = torch.compile(fn, dynamic=False, backend=backend)
            out = partial(*args, **kwargs)
            state["fn"] = partial
            note.append(f"graph breaks ({type(e).__name__})")
        note.append(f"compiled in {time.perf_counter() - t0:.1f} s")
        return out

    return call


def provider_function(case: Case, provider: str, note: list[str]) -> tuple[Callable, str]:
    """The forward callable (**inputs) -> tensor of a provider, and the backend it runs on."""
    if provider == "eager":
        return case.reference, "reference"
    if provider == "compile":
        return case.reference, "compile"  # wrapped per mode by _compile_fn
    if provider in case.baselines:
        b = case.baselines[provider]
        if b.fn is None:
            raise Unavailable(f"{provider} has only an explicit jvp")
        return b.fn, b.backend
    if provider == "scm" or provider.startswith("scm-"):
        from scm_kernels import backend as _backend

        if provider == "scm":
            return case.scm, "auto"
        name = provider[4:]
        if name not in _backend.BACKENDS:
            raise Unavailable(f"unknown backend {name!r}, expected one of {_backend.BACKENDS}")

        def forced(**kw):
            with _backend.use_backend(name):
                return case.scm(**kw)

        return forced, name
    raise Unavailable(f"unknown provider {provider!r}")


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def backend_of(
    case: Case, provider: str, inputs: dict[str, torch.Tensor], compile_backend: str = "inductor"
) -> str:
    """The backend a provider runs on (the automatic choice resolved for the inputs' device)."""
    if provider == "copy":
        return "torch"
    if provider in case.baselines:
        return case.baselines[provider].backend
    name = provider_function(case, provider, [])[1]
    if name == "compile":
        return compile_backend
    if name == "auto":
        from scm_kernels import backend as _backend

        name = _backend.auto_backend(next(iter(inputs.values())).device)
    return name


def jvp_inputs(case: Case, inputs: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
    """(primals, tangents) of mode jvp: the case's differentiable inputs and seeded random tangents."""
    gen = torch.Generator(device=next(iter(inputs.values())).device).manual_seed(1234)
    primals = tuple(inputs[k] for k in case.diff)
    return primals, tuple(torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=gen) for p in primals)


def make_callable(
    case: Case,
    provider: str,
    mode: str,
    inputs: dict[str, torch.Tensor],
    note: list[str],
    compile_backend: str = "inductor",
) -> tuple[Callable[[], Any], str]:
    """A zero-argument callable running `provider` in `mode` on `inputs` (see the module docstring for
    what each mode times), and the backend name. Raises Unavailable when it cannot run."""
    if mode not in case.modes:
        raise Unavailable(f"mode {mode} not declared for this case")
    if provider in case.unavailable:
        raise Unavailable(case.unavailable[provider])
    base = case.baselines.get(provider)
    if base is not None and mode not in base.modes:
        raise Unavailable(f"{provider} is measured in modes {', '.join(base.modes)} only")
    if base is not None and mode == "jvp" and base.jvp is not None:
        primals, tangents = jvp_inputs(case, inputs)
        return (lambda: base.jvp(primals, tangents)), base.backend
    if provider == "copy":
        if mode != "fwd":
            raise Unavailable("copy baseline is measured once per case (mode fwd)")
        src = case.copy_source(inputs)
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), "torch"
    f = provider_function(case, provider, note)[0]
    backend_name = backend_of(case, provider, inputs, compile_backend)
    compile_it = provider == "compile"
    gen = torch.Generator(device=next(iter(inputs.values())).device).manual_seed(1234)

    if mode == "fwd":
        g = _compile_fn(f, note, compile_backend) if compile_it else f

        def run_fwd():
            with torch.no_grad():
                return g(**inputs)

        return run_fwd, backend_name

    if mode in ("bwd", "fwd+bwd"):
        g = _compile_fn(f, note, compile_backend) if compile_it else f
        leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in case.diff}
        kw = {**inputs, **leaves}
        wrt = tuple(leaves.values())
        out = _first_tensor(g(**kw))  # also the warm-up / compile of the training graph
        if not out.requires_grad:
            raise Unavailable(f"output of {provider} does not require grad")
        # in the output's memory layout (channels_last stays channels_last), as a network's upstream
        # gradient is: a contiguous dy would add a layout-transposing copy to every provider's backward
        dy = torch.empty_like(out).normal_(generator=gen)
        if mode == "bwd":  # retained graph, only the backward is timed
            return (lambda: torch.autograd.grad(out, wrt, dy, retain_graph=True)), backend_name

        def run_fwd_bwd():
            return torch.autograd.grad(_first_tensor(g(**kw)), wrt, dy)

        return run_fwd_bwd, backend_name

    # jvp
    names = case.diff
    primals, tangents = jvp_inputs(case, inputs)

    def of_diff(*xs):
        return f(**{**inputs, **dict(zip(names, xs))})

    def jvp(p, t):
        return torch.func.jvp(of_diff, p, t)

    j = _compile_fn(jvp, note, compile_backend) if compile_it else jvp
    return (lambda: j(primals, tangents)), backend_name


# ---------------------------------------------------------------------------------------------
# Peak memory on CPU: a fresh subprocess per (case, provider, mode)
# ---------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak_increase_mb(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak RSS increase (MB) of this process during one call of fn, after a warm-up call.

    Linux: the high-water mark VmHWM is reset through /proc/self/clear_refs ("5") after the warm-up,
    so compilation and lazy initialisation are excluded. Elsewhere: ru_maxrss growth over the first
    call (warm-up included; stated in the returned source)."""
    import resource

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        can_reset = _proc_status_kb("VmHWM") is not None
    except OSError:
        can_reset = False
    if can_reset:
        out = fn()
        del out
        gc.collect()
        _release_freed_memory()  # memory kept by keep_freed_memory() would hide the call's peak
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _proc_status_kb("VmRSS")
        out = fn()
        peak = _proc_status_kb("VmHWM")
        del out
        return max(peak - before, 0) / 1e3, "rss"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    out = fn()
    del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return max(peak - before, 0) / 1e6, "rss-first-call"


def memory_probe(
    case: Case, provider: str, mode: str, device: torch.device, compile_backend: str = "inductor"
) -> dict:
    """Run inside the subprocess: build inputs and the callable, measure peak RSS increase."""
    note: list[str] = []
    inputs = case.make_inputs(device)
    fn, _ = make_callable(case, provider, mode, inputs, note, compile_backend)
    mb, source = rss_peak_increase_mb(fn)
    return {"mem_mb": mb, "mem_source": source}


def memory_in_subprocess(
    op_module: str,
    case: Case,
    provider: str,
    mode: str,
    quick: bool,
    compile_backend: str = "inductor",
    timeout: float = 600.0,
) -> tuple[float | None, str]:
    """Peak RSS increase measured by `python -m benchmarks.run --memory-probe ...` in a fresh process."""
    spec = json.dumps(
        {
            "module": op_module,
            "key": case.key,
            "provider": provider,
            "mode": mode,
            "quick": quick,
            "compile_backend": compile_backend,
        }
    )
    cmd = [sys.executable, "-m", "benchmarks.run", "--memory-probe", spec]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + [p for p in sys.path if p])}
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {timeout:.0f} s"
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY_PROBE ")]
    if res.returncode != 0 or not lines:
        err = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed: {err[:120]}"
    data = json.loads(lines[-1][len("MEMORY_PROBE ") :])
    if "error" in data:
        return None, f"memory probe: {data['error']}"
    return float(data["mem_mb"]), data["mem_source"]


# ---------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    device: torch.device
    providers: tuple[str, ...] = BASE_PROVIDERS
    modes: tuple[str, ...] = MODES
    repeats: int = 25
    min_repeat_ms: float = 1.0
    quick: bool = False
    memory: bool = False
    op_module: str = ""  # module of the bench file, for the --memory subprocess
    compile_backend: str = "inductor"  # torch.compile backend of the "compile" provider
    malloc_kept: bool = False  # CPU: glibc malloc told to keep freed memory (keep_freed_memory)
    baselines: bool = True  # also measure each case's own baselines (Case.baselines)


def case_providers(case: Case, opts: Options) -> list[str]:
    """The providers measured for a case: the chosen ones, then the case's own baselines."""
    extra = [p for p in case.baselines if opts.baselines and p not in opts.providers]
    return list(opts.providers) + extra


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = (
        f"{type(e).__name__}: {msg[0] if msg else ''}"
        if not isinstance(e, Unavailable)
        else (msg[0] if msg else "")
    )
    return text[:160]


def run_case(
    case: Case, opts: Options, env: dict[str, str] | None = None, run_id: str | None = None
) -> list[dict]:
    """Measure every (mode, provider) of one case; return one row (dict of CSV_COLUMNS) per pair.
    Failures become rows with status "n/a" and the reason in `note`."""
    env = env or environment(opts.device)
    run_id = run_id or new_run_id()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # a fresh compile cache per case: no recompile limits across cases
    inputs = case.make_inputs(opts.device)
    rows: list[dict] = []
    for mode in [m for m in MODES if m in case.modes and m in opts.modes]:
        mode_rows: dict[str, dict] = {}
        fns: dict[str, Callable[[], Any]] = {}
        notes: dict[str, list[str]] = {}
        for provider in case_providers(case, opts):
            if provider == "copy" and mode != "fwd":
                continue
            note = notes[provider] = []
            row = mode_rows[provider] = {c: "" for c in CSV_COLUMNS}
            row.update(env)
            row.update(
                run_id=run_id,
                timestamp=stamp,
                op=case.op,
                variant=case.variant,
                provider=provider,
                mode=mode,
                shape=case.shape_str,
                dtype=case.dtype_str,
                status="ok",
            )
            try:
                row["backend"] = backend_of(case, provider, inputs, opts.compile_backend)
                fns[provider] = make_callable(case, provider, mode, inputs, note, opts.compile_backend)[0]
            except Exception as e:  # noqa: BLE001 - the row says n/a and why
                row.update(status="n/a", note="; ".join(note + [_short(e)]))
        if opts.device.type == "cuda":
            timings: dict[str, Timing | Exception] = {}
            for provider, fn in fns.items():
                try:
                    fn()  # warm-up (compilation) before do_bench
                    timings[provider] = time_cuda(fn, quick=opts.quick)
                except Exception as e:  # noqa: BLE001
                    timings[provider] = e
        else:
            repeats = min(opts.repeats, case.max_repeats or opts.repeats)
            timings = time_cpu_many(fns, repeats=repeats, min_repeat_ms=opts.min_repeat_ms)
        for provider, timing in timings.items():
            row, note, fn = mode_rows[provider], notes[provider], fns[provider]
            if isinstance(timing, Exception):
                row.update(status="n/a", note="; ".join(note + [_short(timing)]))
                continue
            if provider == "copy":
                nb, fl = 2 * nbytes(case.copy_source(inputs)), None  # read + write of the copied tensor
            else:
                nb = int(case.bytes(mode, inputs))
                fl = case.flops(mode, inputs) if case.flops is not None else None
            row.update(
                ms_p50=timing.p50,
                ms_p20=timing.p20,
                ms_p80=timing.p80,
                iters=timing.iters,
                repeats=timing.repeats,
                bytes=nb,
                gbps=nb / (timing.p50 * 1e-3) / 1e9,
            )
            if fl:
                row.update(flops=int(fl), tflops=fl / (timing.p50 * 1e-3) / 1e12)
            if opts.device.type == "cuda":
                row.update(mem_mb=cuda_peak_mb(fn, opts.device), mem_source="cuda-peak")
            elif opts.memory:
                mb, source = memory_in_subprocess(
                    opts.op_module, case, provider, mode, opts.quick, opts.compile_backend
                )
                if mb is None:
                    note.append(source)
                    row.update(mem_source="n/a")
                else:
                    row.update(mem_mb=mb, mem_source=source)
            else:
                row.update(mem_mb=nb / 1e6, mem_source="analytic")
            row["note"] = "; ".join(note)
        rows += mode_rows.values()
        del fns
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x_eager / x_compile = baseline time / this row's time (> 1: faster than the baseline), for rows
    of the same op, variant, shape, dtype and mode measured in this run."""

    def k(r):
        return (r["op"], r["variant"], r["shape"], r["dtype"], r["mode"])

    base = {(k(r), r["provider"]): r["ms_p50"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or r["provider"] == "copy":
            continue
        for col, prov in (("x_eager", "eager"), ("x_compile", "compile")):
            b = base.get((k(r), prov))
            if b is not None:
                r[col] = b / r["ms_p50"]


def new_run_id() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TargetResult:
    target: Target
    shape: str
    value: float | None
    status: str  # PASS, FAIL, SKIP (not measured in this run)
    why: str = ""


def evaluate_targets(targets: Sequence[Target], rows: list[dict]) -> list[TargetResult]:
    """Check each target on the rows of this run (scm provider against the same-run baselines)."""
    out: list[TargetResult] = []
    for tg in targets:

        def match(r, provider, tg=tg):
            return (
                r["provider"] == provider
                and r["variant"] == tg.variant
                and r["dtype"] == tg.dtype
                and (tg.shape is None or r["shape"] == tg.shape)
            )

        scm_rows = [r for r in rows if match(r, "scm") and r["mode"] == tg.mode]
        if not scm_rows:
            out.append(TargetResult(tg, tg.shape or "-", None, "SKIP", "not measured in this run"))
            continue
        for r in scm_rows:
            if r["status"] != "ok":
                out.append(TargetResult(tg, r["shape"], None, "FAIL", f"scm not measured: {r['note']}"))
                continue
            if tg.kind in ("x_eager", "x_compile"):
                value = r[tg.kind]
                if value == "":
                    base = "eager" if tg.kind == "x_eager" else "compile"
                    out.append(TargetResult(tg, r["shape"], None, "SKIP", f"no {base} baseline in this run"))
                    continue
            elif tg.kind in ("speedup", "memory"):
                bmode = tg.baseline_mode or tg.mode
                base = [c for c in rows if match(c, tg.baseline) and c["mode"] == bmode and c["shape"] == r["shape"]
                        and c["status"] == "ok"]
                if not base:
                    out.append(TargetResult(tg, r["shape"], None, "SKIP", f"no {tg.baseline} {bmode} row in this run"))
                    continue
                if tg.kind == "speedup":
                    value = base[0]["ms_p50"] / r["ms_p50"]
                else:
                    measured = [x for x in (base[0], r) if x["mem_source"] not in ("analytic", "n/a", "")]
                    if len(measured) < 2:
                        out.append(TargetResult(tg, r["shape"], None, "SKIP",
                                                "memory not measured in this run (CPU: --memory)"))
                        continue
                    value = base[0]["mem_mb"] / max(r["mem_mb"], 1e-3)
            elif tg.kind == "copy_bw":
                copy = [
                    c for c in rows if match(c, "copy") and c["shape"] == r["shape"] and c["status"] == "ok"
                ]
                if not copy:
                    out.append(TargetResult(tg, r["shape"], None, "SKIP", "no copy baseline in this run"))
                    continue
                value = r["gbps"] / copy[0]["gbps"]
            else:
                raise ValueError(f"unknown target kind {tg.kind!r}")
            out.append(
                TargetResult(tg, r["shape"], float(value), "PASS" if value >= tg.threshold else "FAIL")
            )
    return out


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
def _fmt_csv(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def append_csv(rows: list[dict], results_dir: str | Path) -> list[Path]:
    """Append rows to results_dir/<op>.csv (header written when the file is new). A file whose header
    differs (older harness) is kept aside as <op>.csv.old-<n>, never mixed with the new columns."""
    import csv

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in dict.fromkeys(r["op"] for r in rows):
        path = results_dir / f"{op}.csv"
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != CSV_COLUMNS:
                n = 1
                while path.with_name(f"{path.name}.old-{n}").exists():
                    n += 1
                path.rename(path.with_name(f"{path.name}.old-{n}"))
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(CSV_COLUMNS)
            for r in rows:
                if r["op"] == op:
                    w.writerow([_fmt_csv(r[c]) for c in CSV_COLUMNS])
        written.append(path)
    return written


def read_csv(path: str | Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def env_batch(device: torch.device, quick: bool, *, cpu: tuple[int, int], cuda: tuple[int, int]) -> int:
    """Batch size of the whole-network benches: $SCM_BENCH_BATCH if set, else (full, quick) per device."""
    env = os.environ.get("SCM_BENCH_BATCH")
    if env:
        return int(env)
    full, q = cuda if device.type == "cuda" else cpu
    return q if quick else full
