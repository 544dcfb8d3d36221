"""The ``scm`` command line (console script ``scm = scm.cli:main``; ``python -m scm.cli`` works too).

    scm train --preset NAME [--set key=value ...] [--out DIR] [--resume] [--dry-run]
    scm train --config run/config.json [--set ...]          (a run's saved configuration)
    scm sample --ckpt PATH --steps N [--n 64] [--class K] [--seed S] [--out grid.png] [--which ema]
    scm eval --ckpt PATH [--steps 1,2] [--n 1000] [--inception WEIGHTS]     (FID table)
    scm bench [...]                 (the benchmark suite: python -m benchmarks.run [...])
    scm demo [--quick] [--out DIR]  (the end-to-end digits demo, scm.demo)
    scm presets                     (the presets with their parameter counts)

Samplers (``--sampler auto``): consistency sampling (A21 1-step, A22 2-step, N-step over
scm.sampling.consistency_times) for sCT / sCD checkpoints, DPM-Solver-2 over scm.sampling.ode_times
(the EDM schedule; 2N - 1 network evaluations) for teacher checkpoints; heun / ddim on request.

Exit codes: 0 success; 2 bad arguments or configuration (a message, no traceback; ``--dry-run``
validates a preset without training); 1 a failure while running (unreadable checkpoint or data);
130 training stopped by SIGINT/SIGTERM (its checkpoint was written). SCM_DEBUG=1 re-raises errors
with their traceback. scm.training / scm.metrics / scm.demo are imported inside the subcommands, so
``scm presets`` and ``scm train --dry-run`` stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "generate", "main"]

PROG = "scm"
SAMPLERS = ("auto", "consistency", "dpm2", "heun", "ddim")


class CLIError(Exception):
    """An error reported as one line on stderr with exit code `code` (2: usage, 1: runtime)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _debug() -> bool:
    return os.environ.get("SCM_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# Sampling shared by `sample` and `eval`
# ---------------------------------------------------------------------------------------------
def _nfe(sampler: str, steps: int) -> int:
    """Network evaluations: DPM-Solver-2 and Heun call twice per step but the last (the step into 0)."""
    return 2 * steps - 1 if sampler in ("dpm2", "heun") else steps


def _resolve_sampler(sampler: str, kind: str) -> str:
    if sampler == "auto":
        return "dpm2" if kind == "teacher" else "consistency"
    return sampler


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: torch has no CUDA device here")
    return dev


def generate(model, cfg, *, steps: int, labels=None, n: int | None = None, sampler: str = "auto",
             seed: int = 0, guidance: float | None = None, batch: int = 500):
    """Images from a trained network: (images (N, C, H, W) in [-1, 1], seconds of sampling, NFE).

    model: a TrigFlow F (scm.training.load_model); cfg: its Config (sigma_d, loss kind). sampler "auto"
    picks consistency sampling (A21-A22) for sct/scd and DPM-Solver-2 for a teacher. labels: (N,) int64
    class labels for a class-conditional network (ignored when it has none; then give n). The initial
    noise x_T (A20) comes from a CPU generator seeded by `seed`, so the images do not depend on the
    device or on `batch`; consistency renoising uses seed + batch offset. guidance: the guidance input
    of an sCD student of a CFG teacher (default: cfg.loss.guidance)."""
    import torch

    from scm import sampling

    sampler = _resolve_sampler(sampler, cfg.loss.kind)
    if sampler not in SAMPLERS[1:]:
        raise ValueError(f"generate: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generate: steps must be an int >= 1, got {steps!r}")
    sd = cfg.loss.sigma_d
    num_classes = int(getattr(model, "num_classes", 0))
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        n = labels.numel() if n is None else n
        if labels.numel() != n:
            raise ValueError(f"generate: {labels.numel()} labels for n={n} images")
    if n is None or n < 1:
        raise ValueError(f"generate: give labels or n >= 1, got n={n!r}")
    if num_classes and labels is None:
        raise ValueError(f"generate: the network is class-conditional ({num_classes} classes): give labels")
    w = cfg.loss.guidance if guidance is None else guidance
    if getattr(model, "guidance_input", False) and w is None:
        raise ValueError("generate: the network takes a guidance input: give guidance (e.g. --guidance 2)")
    dev = next(model.parameters()).device
    shape = (n, model.in_channels, model.img_resolution, model.img_resolution)
    noise = sampling.initial_noise(shape, sd, generator=torch.Generator().manual_seed(seed))
    if sampler == "consistency":
        times = sampling.consistency_times(steps, sd)
        fn = {1: sampling.sample_onestep, 2: sampling.sample_twostep}.get(steps, sampling.sample_consistency)
    else:
        times = sampling.ode_times(steps, sd)
        fn = {"dpm2": sampling.sample_dpm2, "heun": sampling.sample_heun,
              "ddim": sampling.sample_ddim}[sampler]
    outs, secs = [], 0.0
    for i in range(0, n, batch):
        x = noise[i:i + batch].to(dev)
        kw: dict = {}
        if num_classes:
            kw["class_labels"] = labels[i:i + batch].to(dev)
        if getattr(model, "guidance_input", False):
            kw["guidance"] = torch.full((x.shape[0],), float(w), device=dev)
        extra = {"seed": seed + i} if sampler == "consistency" else {}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        img = fn(model, x, times, sigma_d=sd, model_kwargs=kw, **extra)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs += time.perf_counter() - t0
        outs.append(img.float().clamp(-1, 1).cpu())
    return torch.cat(outs), secs, _nfe(sampler, steps)


def _load(ckpt: str, which: str, device):
    from scm.training import load_model
    if not Path(ckpt).exists():
        raise CLIError(f"--ckpt {ckpt}: no such file or directory")
    try:
        return load_model(ckpt, which=which, device=device)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        if _debug():
            raise
        raise CLIError(f"--ckpt {ckpt}: {e}", code=1) from None


def _labels(model, n: int, klass: int | None):
    """Class labels for n images: all `klass`, or 0..K-1 in turn; None for an unconditional network."""
    import torch
    k = int(getattr(model, "num_classes", 0))
    if klass is not None:
        if not k:
            raise CLIError("--class: the checkpoint's network is unconditional (num_classes=0)")
        if not 0 <= klass < k:
            raise CLIError(f"--class must be in [0, {k - 1}], got {klass}")
        return torch.full((n,), klass, dtype=torch.int64)
    return (torch.arange(n) % k) if k else None


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    import json

    from scm.config import Config, describe, get_preset

    try:
        if args.config:
            try:
                d = json.loads(Path(args.config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CLIError(f"--config {args.config}: cannot read a JSON configuration: {e}") from None
            cfg = Config.from_dict(d)
        else:
            cfg = get_preset(args.preset)
        cfg = cfg.override(args.set or [])
        cfg.validate()
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.dry_run:
        print(describe(cfg))
        print(f"(dry run: the configuration is valid; a run would write to {out})")
        return 0
    from scm.training import train
    try:
        res = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        if _debug():
            raise
        raise CLIError(str(e), code=1) from None
    last = f", last loss {res.losses[-1]:.4g}" if res.losses else ""
    print(f"{cfg.name}: {res.step} steps ({res.nimg:,} images){last}, {res.skipped} skipped; "
          f"checkpoint {res.checkpoint}; output in {res.out_dir}")
    if res.interrupted:
        print("stopped by a signal; continue with --resume", file=sys.stderr)
        return 130
    return 0


def _cmd_sample(args) -> int:
    from scm import metrics

    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    dev = _device(args.device)
    model, cfg = _load(args.ckpt, args.which, dev)
    labels = _labels(model, args.n, args.klass)
    try:
        img, secs, nfe = generate(model, cfg, steps=args.steps, labels=labels, n=args.n, sampler=args.sampler,
                                  seed=args.seed, guidance=args.guidance)
    except ValueError as e:
        raise CLIError(str(e)) from None
    path = metrics.save_grid(img, args.out, nrow=args.nrow, upscale=args.upscale)
    sampler = _resolve_sampler(args.sampler, cfg.loss.kind)
    print(f"{args.n} images from {cfg.name} ({cfg.loss.kind}) with {sampler}, {args.steps} steps "
          f"({nfe} NFE), {1000 * secs / args.n:.3f} ms/image -> {path}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints (e.g. 1,2), got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected step counts >= 1, got {text!r}")
    return vals


def _cmd_eval(args) -> int:
    import torch

    from scm import metrics

    if args.n < 2:
        raise CLIError(f"--n must be >= 2 (a covariance needs two samples), got {args.n}")
    dev = _device(args.device)
    model, cfg = _load(args.ckpt, args.which, dev)
    sampler = _resolve_sampler(args.sampler, cfg.loss.kind)
    steps = args.steps or ([16] if sampler in ("dpm2", "heun", "ddim") else [1, 2])
    labels = _labels(model, args.n, None)
    if args.inception:
        from scm.data import build_dataset
        try:
            extractor = metrics.InceptionFeatures(args.inception, device=dev)
            real_set = build_dataset(cfg.data, split="train")
        except (ValueError, OSError) as e:
            raise CLIError(str(e), code=1) from None
        m = min(len(real_set), args.n_real)
        real = real_set.get_batch(torch.arange(m))[0] if hasattr(real_set, "get_batch") else \
            torch.stack([real_set[i][0] for i in range(m)])
        clf, metric = None, "FID (Inception)"
        ref = f"{m} training images of {cfg.data.source}" + (f" at {cfg.data.path}" if cfg.data.path else "")
    else:
        if cfg.data.source != "digits" or (model.in_channels, model.img_resolution) != (1, 8):
            res = model.img_resolution
            raise CLIError(f"FID-digits needs a checkpoint trained on the 1x8x8 digits (this one: data "
                           f"{cfg.data.source}, {model.in_channels}x{res}x{res}); pass --inception WEIGHTS "
                           "for Inception features")
        from scm.data import DigitsDataset
        clf = metrics.digits_classifier()
        extractor = metrics.DigitsFeatures(clf, device=dev)
        holdout = DigitsDataset("holdout")
        real = torch.stack([holdout[i][0] for i in range(len(holdout))])
        metric, ref = "FID-digits", f"the {len(real)} held-out digits"
    rows = []
    for s in steps:
        try:  # an untimed warm-up call first: one-time costs (kernel loading, caches) are not per image
            generate(model, cfg, steps=s, n=min(args.n, 16), labels=None if labels is None else labels[:16],
                     sampler=sampler, seed=args.seed, guidance=args.guidance)
            img, secs, nfe = generate(model, cfg, steps=s, labels=labels, n=args.n, sampler=sampler,
                                      seed=args.seed, guidance=args.guidance)
        except ValueError as e:
            raise CLIError(str(e)) from None
        fid = metrics.compute_fid(img, real, extractor)
        scored = clf is not None and labels is not None
        acc = metrics.class_accuracy(img, labels, clf) if scored else float("nan")
        rows.append((sampler, s, nfe, fid, acc, 1000.0 * secs / args.n))
    title = (f"{cfg.name} ({cfg.loss.kind}, {args.which} weights of {args.ckpt}): {args.n} samples, "
             f"seed {args.seed}, vs {ref}")
    lines = [title, "",
             f"| sampler | steps | NFE | {metric} | class accuracy | ms / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for sm, s, nfe, fid, acc, ms in rows:
        acc_s = "-" if math.isnan(acc) else f"{acc:.3f}"
        lines.append(f"| {sm} | {s} | {nfe} | {fid:.3f} | {acc_s} | {ms:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    return 0


def _cmd_bench(argv: list[str]) -> int:
    try:
        from benchmarks import run
    except ImportError as e:
        raise CLIError(f"the benchmark suite (the benchmarks package of the scm repository) is not "
                       f"importable: {e}; run from a clone of the repository", code=1) from None
    return int(run.main(argv) or 0)


def _cmd_demo(args) -> int:
    from scm import demo
    demo.main(out=args.out, quick=args.quick)
    return 0


def _cmd_presets(args) -> int:
    from scm import networks
    from scm.config import PRESETS, get_preset

    rows = [("preset", "network", "parameters", "data", "loss", "batch x steps")]
    for name in PRESETS:
        cfg = get_preset(name)
        n = networks.count_parameters(networks.create(cfg.model.preset, device="meta", **cfg.model.kwargs))
        d = cfg.data
        rows.append((name, cfg.model.preset, f"{n:,}",
                     f"{d.source} {d.channels}x{d.resolution}x{d.resolution}", cfg.loss.kind,
                     f"{cfg.run.batch_size} x {cfg.run.steps}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        cells = (c.rjust(w) if i == 2 and j else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  ".join(cells).rstrip())
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from scm.config import PRESETS

    p = argparse.ArgumentParser(prog=PROG, description="Continuous-time consistency models (sCT / sCD): "
                                "train, sample, evaluate, benchmark, demo.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a preset (or a saved config) with key=value overrides",
                       description="Train a teacher / sCT / sCD model. Overrides: section.field=value, e.g. "
                       "--set optim.lr=2e-4 run.steps=100 model.dropout=0.1 loss.teacher=none "
                       "optim.betas=0.9,0.999")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help=f"one of {', '.join(PRESETS)}")
    src.add_argument("--config", metavar="FILE", help="a configuration JSON (e.g. a run's config.json)")
    t.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="overrides")
    t.add_argument("--out", help="output folder (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--dry-run", action="store_true", help="validate, print the description, do not train")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    def sampling_args(q):
        q.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file or run directory")
        q.add_argument("--which", default="ema", help="ema (default), model, or power:<sigma_rel>")
        q.add_argument("--sampler", choices=SAMPLERS, default="auto",
                       help="auto: consistency for sct/scd checkpoints, dpm2 for teachers")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--guidance", type=float, default=None,
                       help="guidance input of a CFG-distilled student")
        q.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")

    s = sub.add_parser("sample", help="sample a checkpoint into a PNG grid")
    sampling_args(s)
    s.add_argument("--steps", type=int, required=True, help="sampler steps (1, 2 or N)")
    s.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--class", dest="klass", type=int, default=None, metavar="K",
                   help="class label of every image (default: classes in turn)")
    s.add_argument("--out", default="grid.png", help="PNG path (default grid.png)")
    s.add_argument("--nrow", type=int, default=None, help="images per row")
    s.add_argument("--upscale", type=int, default=4,
                   help="nearest-neighbour upscaling of the grid (default 4)")
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("eval", help="FID table of a checkpoint (FID-digits, or Inception with --inception)")
    sampling_args(e)
    e.add_argument("--steps", type=_int_list, default=None,
                   help="comma list of step counts (default 1,2 for sct/scd, 16 for ODE samplers)")
    e.add_argument("--n", type=int, default=1000, help="generated images per row (default 1000)")
    e.add_argument("--inception", metavar="WEIGHTS", default=None,
                   help="Inception weights file (see scm.metrics.InceptionFeatures) instead of FID-digits")
    e.add_argument("--n-real", type=int, default=10000, help="real images for --inception (default 10000)")
    e.add_argument("--out", default=None, help="also write the table to this file")
    e.set_defaults(func=_cmd_eval)

    sub.add_parser("bench", help="the benchmark suite: scm bench [args of python -m benchmarks.run]",
                   add_help=False)

    dm = sub.add_parser("demo", help="the end-to-end digits demo (teacher, sCD, sCT, samples, FID table)")
    dm.add_argument("--quick", action="store_true", help="about 2 minutes instead of 8")
    dm.add_argument("--out", default="scm-demo", help="output folder (default scm-demo)")
    dm.set_defaults(func=_cmd_demo)

    pr = sub.add_parser("presets", help="list the presets with their parameter counts")
    pr.set_defaults(func=_cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the scm command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":  # everything after `bench` belongs to benchmarks.run
            return _cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # argparse: 2 for bad arguments, 0 for --help
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except CLIError as e:
        cmd = argv[0] if argv and not argv[0].startswith("-") else ""
        print(f"{PROG}{' ' + cmd if cmd else ''}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
