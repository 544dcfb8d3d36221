"""Tests of the benchmark harness (benchmarks/): timers, providers x modes, CSV rows, targets, the
CLI end to end in a subprocess, and the byte formulas of every bench_<op>.py file.

Kept fast (well under a minute): dummy cases on tiny tensors, 2-3 repeats, torch.compile through
its "eager" backend (dynamo tracing without code generation) except where inductor is the point.
"""

from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import harness, run
from benchmarks.harness import CSV_COLUMNS, Case, Options, Target, nbytes

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# A dummy op: y = 2 x + 1 (d y = 2 d x), its "kernel" and reference the same function
# ---------------------------------------------------------------------------------------------
def _affine(x):
    return x * 2.0 + 1.0


def _dummy_case(scm=_affine, modes=("fwd", "bwd", "fwd+bwd", "jvp"), n=(4, 33)):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        return {"x": torch.randn(n, generator=g, device=device)}

    def nb(mode, i):
        x = i["x"]
        return {"fwd": 2, "bwd": 2, "fwd+bwd": 4, "jvp": 4}[mode] * nbytes(x)

    return Case(
        op="dummy",
        variant="affine",
        shape=n,
        dtype=torch.float32,
        modes=modes,
        make_inputs=make,
        scm=lambda x: scm(x),
        reference=lambda x: _affine(x),
        bytes=nb,
        diff=("x",),
        copy_like="x",
    )


@pytest.fixture
def one_thread():
    """One torch thread: the OpenMP regions of the kernels slow down by 10x-50x when other processes
    oversubscribe the cores (a shared CI machine); these tests check behaviour, not speed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _opts(**kw):
    base = {"device": torch.device("cpu"), "repeats": 3, "min_repeat_ms": 0.2, "compile_backend": "eager"}
    base.update(kw)
    return Options(**base)


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------
def test_quantile_matches_linear_interpolation():
    assert harness.quantile([3.0], 0.5) == 3.0
    assert harness.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert harness.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    v = [float(i) for i in range(11)]
    assert harness.quantile(v, 0.8) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="empty"):
        harness.quantile([], 0.5)


def test_time_cpu_positive_ordered_and_calibrated():
    x = torch.randn(1000)
    t = harness.time_cpu(lambda: x.mul(2.0), repeats=5, min_repeat_ms=0.5)
    assert 0 < t.p20 <= t.p50 <= t.p80
    assert t.repeats == 5
    # a fast call is repeated until one repeat lasts >= min_repeat_ms
    assert t.iters > 1 and t.iters * t.p50 >= 0.5 * 0.5


def test_time_cpu_measures_real_time():
    t = harness.time_cpu(lambda: time.sleep(0.002), repeats=3, min_repeat_ms=1.0, warmup=0)
    assert t.iters == 1
    assert 2.0 <= t.p50 < 50.0


def test_time_cpu_many_interleaves_and_reports_errors():
    calls = []

    def a():
        calls.append("a")

    def b():
        calls.append("b")

    def bad():
        raise RuntimeError("kernel exploded")

    res = harness.time_cpu_many({"a": a, "b": b, "bad": bad}, repeats=4, min_repeat_ms=0.0, warmup=1)
    assert isinstance(res["bad"], RuntimeError)
    assert isinstance(res["a"], harness.Timing) and isinstance(res["b"], harness.Timing)
    assert list(res) == ["a", "b", "bad"]
    # min_repeat_ms=0: one call per repeat; after warm-up + calibration (2 calls each), each of the 4
    # rounds calls every callable once, the order rotated by one each round
    assert calls[-8:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    with pytest.raises(ValueError, match="repeats"):
        harness.time_cpu_many({"a": a}, repeats=0)


# ---------------------------------------------------------------------------------------------
# Modes: what the timed callables compute
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["eager", "compile"])
def test_make_callable_modes_compute_the_right_things(provider):
    case = _dummy_case()
    inputs = case.make_inputs(torch.device("cpu"))
    x = inputs["x"]
    note: list[str] = []
    fwd, _ = harness.make_callable(case, provider, "fwd", inputs, note, "eager")
    torch.testing.assert_close(fwd(), _affine(x))
    bwd, _ = harness.make_callable(case, provider, "bwd", inputs, note, "eager")
    (g1,), (g2,) = bwd(), bwd()  # retained graph: callable twice
    torch.testing.assert_close(g1, g2)
    fb, _ = harness.make_callable(case, provider, "fwd+bwd", inputs, note, "eager")
    (g3,) = fb()
    torch.testing.assert_close(g3, g1)  # same fixed upstream gradient dy
    jvp, _ = harness.make_callable(case, provider, "jvp", inputs, note, "eager")
    out, tan = jvp()
    torch.testing.assert_close(out, _affine(x))
    # dy (bwd) and the input tangent (jvp) are the first normals of a generator seeded 1234
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(g1, 2 * dy)
    torch.testing.assert_close(tan, 2 * dy)
    if provider == "compile":
        assert any("compiled in" in n for n in note)


def test_make_callable_rejects_undeclared_mode_and_unknown_provider():
    case = _dummy_case(modes=("fwd",))
    inputs = case.make_inputs(torch.device("cpu"))
    with pytest.raises(harness.Unavailable, match="mode jvp not declared"):
        harness.make_callable(case, "eager", "jvp", inputs, [])
    with pytest.raises(harness.Unavailable, match="unknown provider 'nope'"):
        harness.make_callable(case, "nope", "fwd", inputs, [])
    with pytest.raises(harness.Unavailable, match="unknown backend 'gpu'"):
        harness.make_callable(case, "scm-gpu", "fwd", inputs, [])
    with pytest.raises(ValueError, match="unknown modes"):
        _dummy_case(modes=("fwd", "sideways"))


# ---------------------------------------------------------------------------------------------
# run_case rows, ratios, CSV
# ---------------------------------------------------------------------------------------------
def test_run_case_rows_ratios_and_failures():
    def broken(x):
        raise RuntimeError("no kernel for this backend")

    rows = harness.run_case(_dummy_case(), _opts(providers=("eager", "compile", "copy")))
    rows_bad = harness.run_case(_dummy_case(scm=broken), _opts(providers=("scm", "eager"), modes=("fwd",)))
    by = {(r["mode"], r["provider"]): r for r in rows}
    assert set(by) == {(m, p) for m in harness.MODES for p in ("eager", "compile")} | {("fwd", "copy")}
    for r in rows:
        assert set(r) == set(CSV_COLUMNS)
        assert r["status"] == "ok", r["note"]
        assert r["ms_p50"] > 0 and r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms_p50"] * 1e-3) / 1e9)
        assert r["mem_source"] == "analytic" and r["mem_mb"] == pytest.approx(r["bytes"] / 1e6)
        assert r["torch"] == torch.__version__ and r["git_commit"] and r["triton"]
    x_bytes = 4 * 33 * 4
    assert by[("fwd", "copy")]["bytes"] == 2 * x_bytes and by[("fwd", "copy")]["x_eager"] == ""
    assert by[("jvp", "eager")]["bytes"] == 4 * x_bytes
    for m in harness.MODES:
        assert by[(m, "eager")]["x_eager"] == pytest.approx(1.0)
        c = by[(m, "compile")]
        assert c["x_eager"] == pytest.approx(by[(m, "eager")]["ms_p50"] / c["ms_p50"])
        assert c["x_compile"] == pytest.approx(1.0)
        assert c["backend"] == "eager" and "compiled in" in c["note"]
    bad = {r["provider"]: r for r in rows_bad}
    assert bad["scm"]["status"] == "n/a" and "RuntimeError: no kernel for this backend" in bad["scm"]["note"]
    assert bad["scm"]["x_eager"] == "" and bad["eager"]["status"] == "ok"


def test_case_baselines_modes_explicit_jvp_and_max_repeats():
    """Case.baselines add providers (in their modes only; an explicit jvp replaces torch.func.jvp);
    max_repeats caps the repeats; an explicit provider list (baselines=False) leaves them out."""
    calls = []

    def explicit(primals, tangents):
        calls.append(len(primals))
        return _affine(primals[0]), 2.0 * tangents[0]

    case = _dummy_case()
    case.baselines = {"slow": harness.Baseline(lambda x: _affine(x).exp().log(), modes=("fwd", "jvp")),
                      "direct": harness.Baseline(None, modes=("jvp",), jvp=explicit, backend="mine")}
    case.max_repeats = 2
    rows = harness.run_case(case, _opts(providers=("eager",)))
    by = {(r["mode"], r["provider"]): r for r in rows}
    assert by[("fwd", "slow")]["status"] == by[("jvp", "slow")]["status"] == "ok"
    assert by[("bwd", "slow")]["status"] == "n/a" and "modes fwd, jvp only" in by[("bwd", "slow")]["note"]
    assert by[("jvp", "direct")]["status"] == "ok" and by[("jvp", "direct")]["backend"] == "mine" and calls
    assert by[("fwd", "direct")]["status"] == "n/a"
    assert all(r["repeats"] == 2 for r in rows if r["status"] == "ok")
    assert by[("jvp", "slow")]["x_eager"] == pytest.approx(by[("jvp", "eager")]["ms_p50"] / by[("jvp", "slow")]["ms_p50"])
    only = harness.run_case(case, _opts(providers=("eager",), baselines=False, modes=("fwd",)))
    assert {r["provider"] for r in only} == {"eager"}


def test_case_unavailable_providers_give_na_rows_with_the_reason():
    case = _dummy_case(modes=("fwd",))
    case.unavailable = {"compile": "not this one", "copy": "nor this"}
    rows = harness.run_case(case, _opts(providers=("scm", "eager", "compile", "copy")))
    by = {r["provider"]: r for r in rows}
    assert by["scm"]["status"] == by["eager"]["status"] == "ok"
    assert (by["compile"]["status"], by["compile"]["note"]) == ("n/a", "not this one")
    assert (by["copy"]["status"], by["copy"]["note"]) == ("n/a", "nor this")


def test_speedup_and_memory_targets():
    def row(provider, mode, ms, mem, source="rss"):
        r = {c: "" for c in CSV_COLUMNS}
        r.update(op="o", variant="v", mode=mode, dtype="fp32", shape="8", provider=provider, status="ok",
                 ms_p50=ms, mem_mb=mem, mem_source=source)
        return r

    rows = [row("scm", "jvp", 3.0, 10.0), row("eager", "fwd", 1.0, 5.0), row("math", "jvp", 15.0, 400.0)]
    targets = [
        Target("jvp <= 3.5x fwd", "v", "jvp", "fp32", "speedup", 1 / 3.5, baseline="eager", baseline_mode="fwd"),
        Target("jvp <= 2x fwd", "v", "jvp", "fp32", "speedup", 1 / 2, baseline="eager", baseline_mode="fwd"),
        Target("4x math", "v", "jvp", "fp32", "speedup", 4.0, baseline="math"),
        Target("mem 20x", "v", "jvp", "fp32", "memory", 20.0, baseline="math"),
        Target("mem 50x", "v", "jvp", "fp32", "memory", 50.0, baseline="math"),
        Target("no such", "v", "jvp", "fp32", "speedup", 1.0, baseline="other"),
    ]
    res = harness.evaluate_targets(targets, rows)
    assert [r.status for r in res] == ["PASS", "FAIL", "PASS", "PASS", "FAIL", "SKIP"]
    assert res[0].value == pytest.approx(1 / 3) and res[2].value == pytest.approx(5.0)
    assert res[3].value == pytest.approx(40.0)
    analytic = [row("scm", "jvp", 3.0, 10.0, "analytic"), rows[2]]
    res = harness.evaluate_targets(targets[3:4], analytic)
    assert res[0].status == "SKIP" and "--memory" in res[0].why


def test_csv_rows_have_every_column_and_append(tmp_path):
    rows = harness.run_case(_dummy_case(modes=("fwd",)), _opts(providers=("eager", "copy")))
    results = tmp_path / "results"  # created on demand
    (path,) = harness.append_csv(rows, results)
    harness.append_csv(rows, results)
    assert path == results / "dummy.csv"
    with open(path, newline="") as fh:
        lines = list(csv.reader(fh))
    assert tuple(lines[0]) == CSV_COLUMNS
    assert len(lines) == 1 + 2 * len(rows)  # one header, rows appended twice
    back = harness.read_csv(path)
    for r in back:
        assert r["op"] == "dummy" and r["device"] == "cpu" and r["dtype"] == "fp32" and r["shape"] == "4x33"
        assert r["torch"] == torch.__version__ and r["triton"] == harness.triton_version()
        assert r["git_commit"] == harness.git_commit() != ""
        assert float(r["ms_p50"]) > 0 and r["status"] == "ok"
    # a file written by an older harness (other header) is kept aside, never mixed
    old = results / "dummy.csv"
    old.write_text("op,ms\nx,1\n")
    harness.append_csv(rows, results)
    assert (results / "dummy.csv.old-1").read_text() == "op,ms\nx,1\n"
    with open(old, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == CSV_COLUMNS


def test_git_commit_unknown_outside_a_repo(monkeypatch, tmp_path):
    harness.git_commit.cache_clear()
    monkeypatch.setattr(harness, "REPO_ROOT", tmp_path)
    try:
        assert harness.git_commit() == "unknown"
    finally:
        harness.git_commit.cache_clear()


def test_evaluate_targets_pass_fail_skip():
    def row(provider, ms, gbps, x_eager, status="ok", shape="8"):
        r = {c: "" for c in CSV_COLUMNS}
        r.update(
            op="o",
            variant="v",
            mode="fwd",
            dtype="fp32",
            shape=shape,
            provider=provider,
            status=status,
            ms_p50=ms,
            gbps=gbps,
            x_eager=x_eager,
            note="" if status == "ok" else "boom",
        )
        return r

    rows = [row("scm", 1.0, 60.0, 2.5), row("eager", 2.5, 10.0, 1.0), row("copy", 0.5, 100.0, "")]
    targets = [
        Target("fast", "v", "fwd", "fp32", "x_eager", 2.0),
        Target("faster", "v", "fwd", "fp32", "x_eager", 3.0),
        Target("bw", "v", "fwd", "fp32", "copy_bw", 0.5),
        Target("bw2", "v", "fwd", "fp32", "copy_bw", 0.7),
        Target("other", "v", "bwd", "fp32", "x_eager", 2.0),
    ]
    res = harness.evaluate_targets(targets, rows)
    assert [(r.target.text, r.status) for r in res] == [
        ("fast", "PASS"),
        ("faster", "FAIL"),
        ("bw", "PASS"),
        ("bw2", "FAIL"),
        ("other", "SKIP"),
    ]
    assert res[2].value == pytest.approx(0.6)
    res = harness.evaluate_targets(targets[:1], [row("scm", "", "", "", status="n/a"), rows[1]])
    assert res[0].status == "FAIL" and "boom" in res[0].why
    res = harness.evaluate_targets(targets[:1], [row("scm", 1.0, 60.0, "")])
    assert res[0].status == "SKIP" and "no eager baseline" in res[0].why


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
DUMMY_BENCH = """
import torch
from benchmarks.harness import Case, Target, nbytes

OP = "dummy_op"
TARGETS = [Target("dummy fwd: scm >= 1000x eager", "affine", "fwd", "fp32", "x_eager", {threshold})]


def _f(x):
    return x * 2.0 + 1.0


def _make(device):
    return {{"x": torch.randn(3, 17, device=device)}}


def cases(device, quick=False):
    return [Case(op=OP, variant="affine", shape=(3, 17), dtype=torch.float32, modes=("fwd", "bwd"),
                 make_inputs=_make, scm=_f, reference=_f, diff=("x",), copy_like="x",
                 bytes=lambda mode, i: 2 * nbytes(i["x"]))]
"""


def _run_cli(args, tmp_path, threshold=1000.0):
    (tmp_path / "dummy_bench_mod.py").write_text(DUMMY_BENCH.format(threshold=threshold))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_quick_end_to_end_and_check_targets(tmp_path):
    results = tmp_path / "res"
    common = [
        "--ops",
        "dummy_bench_mod",
        "--device",
        "cpu",
        "--quick",
        "--repeats",
        "2",
        "--results-dir",
        str(results),
    ]
    ok = _run_cli([*common, "--providers", "eager,copy", "scm"], tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = ok.stdout
    for text in (
        "providers:",
        "mode",
        "x eager",
        "TARGETS dummy_op",
        "FAIL  dummy fwd: scm >= 1000x eager",
        "CSV rows appended",
        "targets: 0 PASS, 1 FAIL",
    ):
        assert text in out, out
    rows = harness.read_csv(results / "dummy_op.csv")
    assert {(r["mode"], r["provider"]) for r in rows} == {
        ("fwd", "scm"),
        ("fwd", "eager"),
        ("fwd", "copy"),
        ("bwd", "scm"),
        ("bwd", "eager"),
    }
    assert all(r["status"] == "ok" and r["repeats"] == "2" for r in rows)


def test_check_targets_sets_the_exit_status(tmp_path, monkeypatch, capsys):
    """A failed target is a report (exit 0) unless --check-targets (exit 1); a reachable one passes."""
    argv = [
        "--ops",
        "dummy_bench_mod_t",
        "--device",
        "cpu",
        "--quick",
        "--repeats",
        "2",
        "--no-csv",
        "--modes",
        "fwd",
        "--providers",
        "scm,eager",
    ]
    monkeypatch.syspath_prepend(str(tmp_path))
    for threshold, plain, checked in ((1000.0, 0, 1), (0.0, 0, 0)):
        (tmp_path / "dummy_bench_mod_t.py").write_text(DUMMY_BENCH.format(threshold=threshold))
        sys.modules.pop("dummy_bench_mod_t", None)
        assert run.main(argv) == plain
        assert run.main([*argv, "--check-targets"]) == checked
        out = capsys.readouterr().out
        assert ("targets: 1 PASS, 0 FAIL" if threshold == 0 else "targets: 0 PASS, 1 FAIL") in out
    sys.modules.pop("dummy_bench_mod_t", None)


def test_cli_rejects_bad_arguments(capsys):
    cases = [
        (["--modes", "sideways"], r"--modes: unknown \['sideways'\]"),
        (["--providers", "numpy"], r"--providers: unknown \['numpy'\]"),
        (["--dtypes", "fp8"], r"--dtypes: unknown \['fp8'\]"),
        (["--repeats", "0"], r"--repeats must be >= 1, got 0"),
        (["--ops", "no_such_op"], r"unknown op 'no_such_op'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], r"--device cuda: no CUDA device"))
    for argv, msg in cases:
        with pytest.raises(SystemExit) as ei:
            run.main([*argv, "--no-csv", "--list"])
        text = str(ei.value.code) + capsys.readouterr().err
        assert ei.value.code != 0
        assert __import__("re").search(msg, text), (argv, text)


def test_plot_needs_matplotlib_or_writes_png(tmp_path):
    from benchmarks import plot

    rows = harness.run_case(_dummy_case(modes=("fwd", "bwd")), _opts(providers=("scm", "eager")))
    harness.append_csv(rows, tmp_path)
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(plot.PlotError, match="pip install matplotlib"):
            plot.plot_results(tmp_path)
        with pytest.raises(SystemExit):
            run.main(["--plot", "--list"])
    else:
        (png,) = plot.plot_results(tmp_path)
        assert png == tmp_path / "dummy_cpu.png" and png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# The bench files of the real ops
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", run.available_ops())
def test_bench_file_declarations_and_byte_formulas(op, one_thread):
    """Every bench file declares OP, TARGETS and cases(); the byte formulas agree with the tensors
    actually read and written by the reference: fwd = inputs + output; fwd+bwd and jvp = fwd + the
    upstream gradient / output tangent (output-sized) + the gradients / input tangents (diff-sized)."""
    mod = importlib.import_module(f"benchmarks.bench_{op}")
    assert mod.OP == op
    for t in mod.TARGETS:
        assert t.kind in ("x_eager", "x_compile", "copy_bw", "speedup", "memory") and t.mode in harness.MODES
        assert bool(t.baseline) == (t.kind in ("speedup", "memory"))
    try:
        cases = mod.cases(torch.device("cpu"), quick=True)
        declared = [c for dev in ("cpu", "cuda") for quick in (False, True)
                    for c in mod.cases(torch.device(dev), quick=quick)]  # Cases build no tensors
    except harness.Unavailable as e:
        pytest.skip(f"{op} not available yet: {e}")
    assert cases and all(c.op == op for c in cases)
    assert len({c.key for c in cases}) == len(cases)
    for t in mod.TARGETS:  # every target names a case (of some device and size) and a provider that exist
        assert any(
            c.variant == t.variant
            and c.dtype_str == t.dtype
            and t.mode in c.modes
            and (t.shape is None or c.shape_str == t.shape)
            and (t.baseline in ("", "eager", "compile") or t.baseline in c.baselines)
            for c in declared
        ), t
    for c in cases:
        inputs = c.make_inputs(torch.device("cpu"))
        with torch.no_grad():
            out = c.reference(**inputs)
        assert isinstance(out, torch.Tensor)
        fwd = sum(nbytes(v) for v in inputs.values()) + nbytes(out)
        assert c.bytes("fwd", inputs) == fwd, c.key
        grads = sum(nbytes(inputs[k]) for k in c.diff)
        for mode in ("fwd+bwd", "jvp"):
            if mode in c.modes:
                assert c.bytes(mode, inputs) == fwd + nbytes(out) + grads, (c.key, mode)
        if "bwd" in c.modes:
            assert nbytes(out) + grads <= c.bytes("bwd", inputs) <= c.bytes("fwd+bwd", inputs), c.key
        if c.copy_like is not None:
            assert nbytes(c.copy_source(inputs)) > 0


def test_real_op_eager_and_copy_through_the_cli(tmp_path):
    """The real time_embedding bench file end to end (eager and copy only: independent of the state
    of the op's kernels)."""
    try:
        harness.import_op("time_embedding")
    except harness.Unavailable as e:
        pytest.skip(str(e))
    res = _run_cli(
        [
            "--ops",
            "time_embedding",
            "--device",
            "cpu",
            "--quick",
            "--repeats",
            "2",
            "--modes",
            "fwd",
            "--providers",
            "eager,copy",
            "--results-dir",
            str(tmp_path / "r"),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = harness.read_csv(tmp_path / "r" / "time_embedding.csv")
    assert {(r["shape"], r["provider"]) for r in rows} == {
        (s, p) for s in ("256x256", "256x1024") for p in ("eager", "copy")
    }
    assert all(r["status"] == "ok" for r in rows)
    assert "SKIP  time_embedding fwd fp32" in res.stdout  # no scm row in this run: target not measured


def test_peak_rss_increase_sees_a_large_allocation(tmp_path, monkeypatch):
    """--memory: the peak-RSS increase of one call (in-process helper, then the fresh-subprocess probe)."""
    mb, source = harness.rss_peak_increase_mb(lambda: torch.ones(20_000_000))  # 80 MB, touched
    assert source.startswith("rss") and 70 <= mb < 400
    mb_small, _ = harness.rss_peak_increase_mb(lambda: torch.ones(10))
    assert mb_small < 20
    (tmp_path / "dummy_bench_mod_m.py").write_text(DUMMY_BENCH.format(threshold=1.0))
    monkeypatch.syspath_prepend(str(tmp_path))
    case = importlib.import_module("dummy_bench_mod_m").cases(torch.device("cpu"))[0]
    mb, source = harness.memory_in_subprocess("dummy_bench_mod_m", case, "eager", "fwd", quick=True)
    assert mb is not None and 0 <= mb < 50 and source.startswith("rss"), source
    mb, why = harness.memory_in_subprocess("dummy_bench_mod_m", case, "eager", "jvp", quick=True)
    assert mb is None and "mode jvp not declared" in why


# ---------------------------------------------------------------------------------------------
# The scm benches (issue 5): a training step and the samplers, at tiny sizes
# ---------------------------------------------------------------------------------------------
def test_train_step_bench_providers_run_and_agree(monkeypatch, one_thread):
    """bench_train_step: the fused, reference-ops and torch.func.jvp + math-SDPA steps all run, their
    first steps from the same weights give the same loss, the math-SDPA provider really goes through
    torch's SDPA, and compile / copy are n/a rows that say why."""
    import torch.nn.functional as F

    from benchmarks import bench_train_step as bts

    monkeypatch.setenv("SCM_BENCH_BATCH", "2")
    (case,) = bts.cases(torch.device("cpu"), quick=True)
    assert case.shape == (2, 3, 32, 32)
    inputs = case.make_inputs(torch.device("cpu"))
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    # 3 steps each (the U-Net's output layer starts at zero: the later steps see a non-zero network)
    losses = {name: torch.stack([fn(**inputs) for _ in range(3)]) for name, fn in
              (("scm", case.scm), ("eager", case.reference), ("math", case.baselines["func-sdpa-math"].fn))}
    assert sdpa_calls  # JVP pass + gradient pass of the math-SDPA provider
    assert all(torch.isfinite(v).all() for v in losses.values())
    torch.testing.assert_close(losses["scm"], losses["eager"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["math"], losses["eager"], rtol=1e-4, atol=1e-6)
    n = len(sdpa_calls)
    case.scm(**inputs), case.reference(**inputs)  # the other providers never use torch's SDPA
    assert len(sdpa_calls) == n
    opts = _opts(providers=("scm", "eager", "compile", "copy"), repeats=1, min_repeat_ms=0.0)
    rows = harness.run_case(bts.cases(torch.device("cpu"), quick=True)[0], opts)
    by = {r["provider"]: r for r in rows}
    assert {p: r["status"] for p, r in by.items()} == {
        "scm": "ok", "eager": "ok", "func-sdpa-math": "ok", "compile": "n/a", "copy": "n/a"}
    assert "not measured" in by["compile"]["note"] and by["scm"]["x_eager"] > 0
    res = harness.evaluate_targets(bts.TARGETS, rows)
    assert [r.status for r in res][1] == "SKIP"  # memory needs --memory
    assert res[0].status in ("PASS", "FAIL") and res[0].value == pytest.approx(by["scm"]["x_eager"])


def test_sampling_bench_fused_and_reference_give_the_same_images(monkeypatch, one_thread):
    """bench_sampling: every sampler runs on both providers through the harness, and the fused and the
    reference-ops samplers produce the same images from the same noise: against the reference
    sampler in float64, the fused one's error is within the tolerance rule of the reference's own
    fp32 error (the heun case's random network grows to |x| ~ 170, where fp32 rounding alone differs
    by ~1e-4 between two summation orders)."""
    from tests.conftest import assert_rule

    from benchmarks import bench_sampling as bs

    monkeypatch.setenv("SCM_BENCH_BATCH", "2")
    monkeypatch.setenv("SCM_BENCH_ODE_STEPS", "2")
    monkeypatch.setenv("SCM_BENCH_ODE", "dpm2,heun")
    cases = bs.cases(torch.device("cpu"), quick=True)
    assert [c.variant for c in cases] == ["1-step", "2-step", "dpm2-2", "heun-2"]
    bs._network.cache_clear()
    nets = {}
    for backend in (None, "reference"):  # the same non-zero weights (the output layer starts at zero)
        net = nets[backend] = bs._network(bs.net_name(), backend, "cpu")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            assert net(torch.randn(2, 3, 32, 32), torch.ones(2)).abs().mean() > 1e-3  # F is not 0
    for case in cases:
        inputs = case.make_inputs(torch.device("cpu"))
        a, b = case.scm(**inputs), case.reference(**inputs)
        assert a.shape == inputs["noise"].shape and torch.isfinite(a).all()
        nets["reference"].double()  # the float32 weights, exactly
        try:
            want = case.reference(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
        finally:
            nets["reference"].float()
        assert_rule(a, want, b, torch.float32, what=case.variant)
        rows = harness.run_case(case, _opts(providers=("scm", "eager"), repeats=1, min_repeat_ms=0.0))
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
    bs._network.cache_clear()
