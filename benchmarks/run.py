"""Benchmark the scm_kernels ops against their eager reference, torch.compile and a copy.

    python -m benchmarks.run                      # every op, realistic sizes, this machine's device
    python -m benchmarks.run --device cpu --quick # fewer repeats, no torch.compile (about a minute)
    python -m benchmarks.run --ops scm_loss --modes fwd+bwd --providers scm,eager --repeats 50
    python -m benchmarks.run --plot               # also write PNG charts next to the CSV files

Each op is a file benchmarks/bench_<op>.py (see benchmarks/harness.py for what a case declares).
Prints one table per op and a TARGETS block with the issue's performance targets, PASS or FAIL;
appends every row to benchmarks/results/<op>.csv. Exits 0 even when a target fails (it is a
report), unless --check-targets is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

import torch

from benchmarks import harness
from benchmarks.harness import MODES, Options, Unavailable

QUICK_REPEATS = 10
FULL_REPEATS = 25
QUICK_MIN_REPEAT_MS = 2.0
FULL_MIN_REPEAT_MS = 10.0


# ---------------------------------------------------------------------------------------------
# Ops = benchmarks/bench_<op>.py files (or any importable module with OP and cases())
# ---------------------------------------------------------------------------------------------
def available_ops() -> list[str]:
    import benchmarks

    return sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )


def op_module_name(name: str) -> str:
    """benchmarks.bench_<name> for a known op, else `name` itself as a module path (out-of-tree ops)."""
    return f"benchmarks.bench_{name}" if name in available_ops() else name


def load_op(name: str):
    modname = op_module_name(name)
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name in (modname, modname.split(".")[0]):
            raise SystemExit(
                f"error: unknown op {name!r}; known ops: {', '.join(available_ops())} "
                "(or give an importable module that defines OP and cases())"
            ) from e
        raise
    if not hasattr(mod, "cases") or not hasattr(mod, "OP"):
        raise SystemExit(f"error: module {modname} must define OP and cases(device, quick)")
    return mod


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------
def _num(v, fmt: str) -> str:
    return "" if v == "" or v is None else format(v, fmt)


def _ratio(v) -> str:
    return "" if v == "" or v is None else f"{v:.2f}x"


def format_table(rows: list[dict]) -> str:
    has_flops = any(r.get("tflops") not in ("", None) for r in rows)
    head = ["mode", "variant", "shape", "dtype", "provider", "backend", "ms", "p20-p80 ms", "GB/s"]
    head += ["TFLOP/s"] if has_flops else []
    head += ["mem MB", "x eager", "x compile", "note"]
    lines = []
    prev = None
    for r in rows:
        group = (r["variant"], r["shape"], r["dtype"], r["mode"])
        if prev is not None and group != prev:
            lines.append(None)  # separator
        prev = group
        key = [r["mode"], r["variant"], r["shape"], r["dtype"], r["provider"], r["backend"]]
        if r["status"] != "ok":
            cells = [
                *key,
                "n/a",
                "",
                "",
                *([""] if has_flops else []),
                "",
                "",
                "",
                r["note"],
            ]
        else:
            mem = _num(r["mem_mb"], ".2f")
            if r["mem_source"] == "analytic" and mem:
                mem += "*"
            cells = [
                *key,
                _num(r["ms_p50"], ".4f"),
                f"{r['ms_p20']:.4f}-{r['ms_p80']:.4f}",
                _num(r["gbps"], ".1f"),
                *([_num(r["tflops"], ".3f")] if has_flops else []),
                mem,
                _ratio(r["x_eager"]),
                _ratio(r["x_compile"]),
                r["note"],
            ]
        lines.append(cells)
    widths = [len(h) for h in head]
    for cells in lines:
        if cells:
            widths = [max(w, len(str(c))) for w, c in zip(widths, cells)]
    widths[-1] = len(head[-1])  # the note is free-form, not padded
    right = {"ms", "p20-p80 ms", "GB/s", "TFLOP/s", "mem MB", "x eager", "x compile"}

    def fmt(cells):
        out = []
        for h, w, c in zip(head, widths, cells):
            out.append(str(c).rjust(w) if h in right else str(c).ljust(w))
        return "  ".join(out).rstrip()

    rule = "-" * min(sum(widths) + 2 * (len(widths) - 1) + 20, 160)
    text = [fmt(head), rule]
    text += [fmt(c) if c else "" for c in lines]
    return "\n".join(text)


def format_targets(results: list[harness.TargetResult]) -> str:
    if not results:
        return "  (no targets declared)"
    lines = []
    for tr in results:
        t = tr.target
        unit = {"copy_bw": "of copy GB/s", "x_eager": "x eager", "x_compile": "x compile",
                "speedup": f"x ({t.baseline} {t.baseline_mode or t.mode} time / scm time)",
                "memory": f"x ({t.baseline} peak memory / scm's)"}[t.kind]
        need = f"{t.threshold:.0%} {unit}" if t.kind == "copy_bw" else f"{t.threshold:.2f}{unit}"
        got = (
            "-"
            if tr.value is None
            else (f"{tr.value:.0%} {unit}" if t.kind == "copy_bw" else f"{tr.value:.2f}{unit}")
        )
        shape = f" [{tr.shape}]" if tr.shape not in ("-", t.shape) else ""
        why = f"  ({tr.why})" if tr.why else ""
        lines.append(f"  {tr.status:4s}  {t.text}{shape}: need >= {need}, measured {got}{why}")
    return "\n".join(lines)


def legend(opts: Options, env: dict[str, str]) -> str:
    from scm_kernels import backend as _backend

    auto = _backend.auto_backend(opts.device)
    if opts.device.type == "cuda":
        timer = "triton.testing.do_bench, p50 (p20-p80)"
        mem = "peak CUDA memory allocated during one call"
    else:
        timer = f"median (p20-p80) of {opts.repeats} repeats, each >= {opts.min_repeat_ms:g} ms of calls"
        timer += ", after a warm-up"
        if opts.malloc_kept:
            timer += "; malloc keeps freed memory (no page faults for fresh outputs, see harness.keep_freed_memory)"
        mem = "* = analytic bytes of the mode's inputs + outputs (measure with --memory)"
        if opts.memory:
            mem = "peak RSS increase during one call, fresh subprocess"
    head = (
        f"scm_kernels benchmarks  |  device {env['device']} ({env['device_name']}, {env['threads']} threads)"
    )
    head += f"  |  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}"
    providers = f"providers: scm = scm_kernels op (automatic backend here: {auto}); eager = the op's PyTorch"
    providers += (
        " reference; compile = torch.compile(reference); copy = same-size tensor copy (bandwidth baseline);"
        " other names: an op's own baselines (see its bench_<op>.py)"
    )
    modes = "modes:     fwd = forward (no grad); bwd = backward only (graph built once, timed with"
    modes += " retain_graph=True); fwd+bwd = forward + backward; jvp = torch.func.jvp"
    lines = [
        head,
        providers,
        modes,
        f"ms:        {timer}",
        "GB/s:      minimal bytes (each input read once + each output written once; see bench_<op>.py) / ms",
        f"mem MB:    {mem}",
        "x eager / x compile: baseline time / this time, same run (> 1 = faster than the baseline)",
    ]
    return "\n".join(lines + busy_warning(opts, env))


def busy_warning(opts: Options, env: dict[str, str]) -> list[str]:
    """A warning line when other processes load the CPU: absolute times are then unreliable."""
    cores = os.cpu_count() or 1
    if opts.device.type != "cpu" or not env.get("load") or float(env["load"]) <= 0.75 * cores:
        return []
    return [
        (
            f"WARNING: the machine is busy (1-min load {env['load']} on {cores} cores): absolute times are "
            "unreliable; the ratios (repeats of all providers interleaved) are the numbers to compare."
        )
    ]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ops", nargs="+", metavar="OP", help=f"ops to run (default: all of {', '.join(available_ops())})"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_REPEATS} repeats and no torch.compile provider (unless asked with --providers)",
    )
    p.add_argument("--modes", nargs="+", metavar="MODE", help=f"subset of {', '.join(MODES)}")
    p.add_argument(
        "--providers",
        nargs="+",
        metavar="PROVIDER",
        help="subset of scm, scm-<backend> (triton, cuda, cpu, reference), eager, compile, copy, and the "
        "ops' own baselines (bench_<op>.py BASELINES, e.g. attention's sdpa-math) "
        "(default: scm eager compile copy + the ops' baselines)",
    )
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE", help="subset of fp32, bf16, fp16")
    p.add_argument(
        "--repeats", type=int, help=f"timed repeats on CPU (default {FULL_REPEATS}, --quick {QUICK_REPEATS})"
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile provider (default inductor)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="CPU: measure peak RSS in a fresh subprocess per (case, provider, mode) (slow)",
    )
    p.add_argument(
        "--plot", action="store_true", help="write PNG charts from the CSV files (needs matplotlib)"
    )
    p.add_argument("--check-targets", action="store_true", help="exit 1 if any performance target fails")
    p.add_argument("--results-dir", default=str(harness.DEFAULT_RESULTS_DIR), help="where the CSV files go")
    p.add_argument("--no-csv", action="store_true", help="do not append to the CSV files")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one --memory measurement
    return p


def _memory_probe(spec: str) -> int:
    try:
        s = json.loads(spec)
        mod = importlib.import_module(s["module"])
        device = torch.device("cpu")
        case = next((c for c in mod.cases(device, s["quick"]) if c.key == s["key"]), None)
        if case is None:
            raise LookupError(f"no case {s['key']!r} in {s['module']}")
        data = harness.memory_probe(
            case, s["provider"], s["mode"], device, s.get("compile_backend", "inductor")
        )
    except Exception as e:  # noqa: BLE001 - sent back to the parent, which reports it
        data = {"error": f"{type(e).__name__}: {e}"[:200]}
    print("MEMORY_PROBE " + json.dumps(data), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_probe:
        return _memory_probe(args.memory_probe)

    if args.plot:  # fail before a long run, not after it
        from benchmarks import plot

        try:
            plot._matplotlib()
        except plot.PlotError as e:
            parser.error(f"--plot: {e}")
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    device = torch.device(device_type)

    modes = tuple(_split(args.modes) or MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; expected a subset of {list(MODES)}")
    ops = _split(args.ops) or available_ops()
    mods = [load_op(name) for name in ops]
    if args.providers:
        providers = tuple(_split(args.providers))
        extra = sorted({b for mod in mods for b in getattr(mod, "BASELINES", ())})
        bad = [p for p in providers if p not in harness.BASE_PROVIDERS + tuple(extra) and not p.startswith("scm-")]
        if bad:
            parser.error(f"--providers: unknown {bad}; expected scm, scm-<backend>, eager, compile, copy"
                         + (f" or a baseline of the chosen ops ({', '.join(extra)})" if extra else ""))
    else:
        providers = tuple(p for p in harness.BASE_PROVIDERS if not (args.quick and p == "compile"))
    dtypes = _split(args.dtypes)
    if dtypes:
        bad = [d for d in dtypes if d not in harness.DTYPES_BY_NAME]
        if bad:
            parser.error(f"--dtypes: unknown {bad}; expected names like fp32, bf16, fp16")
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else FULL_REPEATS)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.list:
        for mod in mods:
            try:
                cs = mod.cases(device, args.quick)
            except Unavailable as e:
                print(f"{mod.OP}: unavailable ({e})")
                continue
            for c in cs:
                print(
                    f"{c.op:16s} {c.variant:14s} {c.shape_str:14s} {c.dtype_str:5s} modes {','.join(c.modes)}"
                )
        return 0

    opts = Options(
        device=device,
        providers=providers,
        modes=modes,
        repeats=repeats,
        # Long repeats amortize what this noisy 2-core machine adds per call burst (thread wake-up,
        # page faults of fresh outputs); --quick trades that for time.
        min_repeat_ms=QUICK_MIN_REPEAT_MS if args.quick else FULL_MIN_REPEAT_MS,
        quick=args.quick,
        memory=args.memory,
        compile_backend=args.compile_backend,
        baselines=not args.providers,  # an explicit --providers list is the whole list
    )
    if device.type == "cpu":
        opts.malloc_kept = harness.keep_freed_memory()
    env = harness.environment(device)
    run_id = harness.new_run_id()
    print(legend(opts, env))
    if args.quick and not args.providers:
        print("(--quick: torch.compile is skipped; run without --quick for the x compile column)")
    print(flush=True)

    all_rows: list[dict] = []
    all_targets: list[harness.TargetResult] = []
    t_start = time.perf_counter()
    for mod in mods:
        op = mod.OP
        targets = list(getattr(mod, "TARGETS", []))
        print(f"=== {op} " + "=" * max(0, 90 - len(op)), flush=True)
        try:
            cases = mod.cases(device, args.quick)
        except Unavailable as e:
            print(f"  skipped: {e}\n")
            results = [
                harness.TargetResult(t, t.shape or "-", None, "FAIL", f"op unavailable: {e}") for t in targets
            ]
            all_targets += results
            print(f"TARGETS {op}\n{format_targets(results)}\n", flush=True)
            continue
        if dtypes:
            cases = [c for c in cases if c.dtype_str in dtypes]
        opts.op_module = mod.__name__
        rows: list[dict] = []
        for case in cases:
            t0 = time.perf_counter()
            print(
                f"  measuring {case.variant} {case.shape_str} {case.dtype_str} ...",
                end="",
                file=sys.stderr,
                flush=True,
            )
            rows += harness.run_case(case, opts, env=env, run_id=run_id)
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        print(format_table(rows) if rows else "  (no case matches the filters)")
        results = harness.evaluate_targets(targets, rows)
        all_targets += results
        print(f"\nTARGETS {op}\n{format_targets(results)}\n", flush=True)
        all_rows += rows

    if all_rows and not args.no_csv:
        paths = harness.append_csv(all_rows, args.results_dir)
        print("CSV rows appended to: " + ", ".join(str(p) for p in paths))
    if args.plot and all_rows:
        from benchmarks import plot

        try:
            pngs = plot.plot_results(
                args.results_dir,
                ops=[m.OP for m in mods],
                run_id=None if args.no_csv else run_id,
                rows=all_rows if args.no_csv else None,
            )
        except plot.PlotError as e:
            print(f"--plot: {e}", file=sys.stderr)
            return 2
        print("charts written: " + ", ".join(str(p) for p in pngs))

    n = {s: sum(r.status == s for r in all_targets) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"targets: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} not measured  |  "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    if args.check_targets and n["FAIL"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
