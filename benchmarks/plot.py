"""PNG charts of benchmark results (`python -m benchmarks.run --plot`, or
`python -m benchmarks.plot [--results-dir DIR] [--ops OP ...]` on existing CSV files).

One PNG per op and device, `<results>/<op>_<device>.png`, from that op's latest run in
`<results>/<op>.csv`: one panel per mode, one group of bars per case (variant, shape, dtype), one
bar per provider showing the median time with its p20-p80 range, and the speed-up over eager
written above each scm bar. matplotlib is a dependency of scm (installed by scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import harness


class PlotError(RuntimeError):
    """Plotting cannot run (matplotlib missing, no results); the message says what to do."""


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError(
            "charts need matplotlib, which is not installed: pip install matplotlib"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_op(rows: list[dict], out_path: Path) -> Path:
    """One chart for the rows of one op and device (one run)."""
    plt = _matplotlib()
    modes = [m for m in harness.MODES if any(r["mode"] == m for r in rows)]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.2 * len(modes)), squeeze=False)
    op, device = rows[0]["op"], rows[0]["device"]
    for ax, mode in zip(axes[:, 0], modes):
        mrows = [r for r in rows if r["mode"] == mode]
        groups = list(dict.fromkeys((r["variant"], r["shape"], r["dtype"]) for r in mrows))
        width = 0.8 / max(len(providers), 1)
        for j, prov in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                r = next(
                    (
                        r
                        for r in mrows
                        if (r["variant"], r["shape"], r["dtype"]) == g and r["provider"] == prov
                    ),
                    None,
                )
                p50 = _float(r["ms_p50"]) if r and r["status"] == "ok" else None
                if p50 is None:
                    continue
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(p50)
                lo.append(p50 - (_float(r["ms_p20"]) or p50))
                hi.append((_float(r["ms_p80"]) or p50) - p50)
                if prov == "scm" and _float(r["x_eager"]):
                    top = max(p50, _float(r["ms_p80"]) or p50)  # above the error bar
                    ax.annotate(
                        f"{float(r['x_eager']):.1f}x", (xs[-1], top), ha="center", va="bottom", fontsize=7
                    )
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=prov, capsize=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{v}\n{s} {d}" for v, s, d in groups], fontsize=8)
        ax.set_ylabel("ms (p50, p20-p80)")
        ax.set_title(f"{op} {mode}", fontsize=10)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(
        f"{op} on {device} ({r0['device_name']}), torch {r0['torch']}, commit {r0['git_commit']}; "
        "label: x eager of scm",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_results(
    results_dir: str | Path,
    ops: list[str] | None = None,
    run_id: str | None = None,
    rows: list[dict] | None = None,
) -> list[Path]:
    """Charts for each op from its CSV (rows of `run_id`, default: the latest run of each device), or
    from `rows` given directly. Returns the PNG paths."""
    _matplotlib()  # fail early and clearly
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    by_op: dict[str, list[dict]] = {}
    if rows is not None:
        for r in rows:
            by_op.setdefault(r["op"], []).append(r)
    else:
        paths = [results_dir / f"{op}.csv" for op in ops] if ops else sorted(results_dir.glob("*.csv"))
        for p in paths:
            if not p.exists():
                raise PlotError(f"no results file {p}; run `python -m benchmarks.run` first")
            by_op[p.stem] = harness.read_csv(p)
    written = []
    for op, op_rows in by_op.items():
        for device in dict.fromkeys(r["device"] for r in op_rows):
            dev_rows = [r for r in op_rows if r["device"] == device]
            rid = (
                run_id
                if run_id is not None and any(r["run_id"] == run_id for r in dev_rows)
                else dev_rows[-1]["run_id"]
            )
            sel = [r for r in dev_rows if r["run_id"] == rid]
            if sel:
                written.append(plot_op(sel, results_dir / f"{op}_{device}.png"))
    if not written:
        raise PlotError(f"no benchmark rows to plot in {results_dir}")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results-dir", default=str(harness.DEFAULT_RESULTS_DIR))
    p.add_argument("--ops", nargs="+")
    args = p.parse_args(argv)
    try:
        paths = plot_results(args.results_dir, ops=args.ops)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("charts written: " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
