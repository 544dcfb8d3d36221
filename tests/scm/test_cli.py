"""Tests of the `scm` command line (scm.cli.main): `train --dry-run` validates every preset, bad
arguments exit with code 2 and one clear message (no traceback), `bench` / `demo` forward their
arguments, and train -> sample -> eval run end to end on tiny settings (a few steps of the digits
presets on the CPU; the eval's FID-digits number equals a direct computation)."""

from __future__ import annotations

import json

import pytest
import torch

from scm import cli, networks
from scm.config import PRESETS, get_preset

pytestmark = pytest.mark.reference


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(PRESETS))
def test_train_dry_run_every_preset(capsys, name):
    code, out, err = _run(capsys, "train", "--preset", name, "--dry-run")
    assert code == 0, err
    cfg = get_preset(name)
    n = networks.count_parameters(networks.create(cfg.model.preset, device="meta", **cfg.model.kwargs))
    assert f"{n:,} parameters on the meta device" in out and f"runs/{name}" in out


def test_presets_table(capsys):
    code, out, _ = _run(capsys, "presets")
    assert code == 0
    for name in PRESETS:
        cfg = get_preset(name)
        n = networks.count_parameters(networks.create(cfg.model.preset, device="meta", **cfg.model.kwargs))
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert f"{n:,}" in line and cfg.model.preset in line


def test_train_config_file_and_overrides(capsys, tmp_path):
    cfg = get_preset("digits-sct").override(["run.steps=7"])
    f = tmp_path / "config.json"
    f.write_text(json.dumps(cfg.to_dict()))
    code, out, err = _run(capsys, "train", "--config", str(f), "--set", "optim.lr=3e-4", "--set",
                          "run.batch_size=64", "--dry-run", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "7 steps x batch 64" in out and "lr 0.0003" in out and str(tmp_path / "o") in out


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["nope"], "invalid choice: 'nope'"),
    (["train"], "one of the arguments --preset --config is required"),
    (["train", "--preset", "digits"], "argument --preset: invalid choice: 'digits'"),
    (["train", "--preset", "digits-teacher", "--config", "c.json"], "not allowed with argument"),
    (["train", "--preset", "digits-teacher", "--set", "optim.lr=x", "--dry-run"],
     "optim.lr='x': expected a float"),
    (["train", "--preset", "digits-teacher", "--set", "optim.learning_rate=1", "--dry-run"],
     "unknown key 'optim.learning_rate'"),
    (["train", "--preset", "digits-teacher", "--set", "lr", "--dry-run"], "expected 'key=value'"),
    (["train", "--preset", "digits-teacher", "--set", "model.depth=3", "--dry-run"],
     "not a parameter of UNet"),
    (["train", "--preset", "digits-teacher", "--set", "data.resolution=16", "--dry-run"],
     "data.resolution=16 does not match the network's img_resolution=8"),
    (["train", "--preset", "digits-scd", "--set", "loss.teacher=none", "--dry-run"], "needs a teacher"),
    (["train", "--preset", "digits-teacher", "--set", "run.grad_accum=3", "--dry-run"],
     "divisible by run.grad_accum"),
    (["train", "--config", "/nonexistent/config.json", "--dry-run"], "cannot read a JSON configuration"),
    (["sample", "--steps", "1"], "the following arguments are required: --ckpt"),
    (["sample", "--ckpt", "/nonexistent/run", "--steps", "1"], "--ckpt /nonexistent/run: no such file"),
    (["sample", "--ckpt", "/nonexistent/run", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "--ckpt", "x", "--steps", "two"], "argument --steps: invalid int value"),
    (["sample", "--ckpt", "x", "--steps", "1", "--sampler", "euler"], "argument --sampler: invalid choice"),
    (["eval", "--ckpt", "x", "--steps", "1,a"], "expected a comma list of ints"),
    (["eval", "--ckpt", "x", "--steps", "0"], "expected step counts >= 1"),
    (["demo", "--fast"], "unrecognized arguments: --fast"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert err.strip().splitlines()[-1].startswith("scm")  # "scm[ cmd]: error: ..."


def test_bench_forwards_arguments(monkeypatch):
    from benchmarks import run
    seen = []
    monkeypatch.setattr(run, "main", lambda argv=None: seen.append(argv) or 3)
    assert cli.main(["bench", "--device", "cpu", "--ops", "x"]) == 3
    assert seen == [["--device", "cpu", "--ops", "x"]]


def test_demo_forwards_arguments(monkeypatch, tmp_path):
    from scm import demo
    seen = []
    monkeypatch.setattr(demo, "main",
                        lambda out="scm-demo", quick=False, **kw: seen.append((out, quick)) or {})
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert cli.main(["demo"]) == 0
    assert seen == [(str(tmp_path), True), ("scm-demo", False)]


# ---------------------------------------------------------------------------------------------
# End to end on tiny settings
# ---------------------------------------------------------------------------------------------
TINY = ["run.batch_size=8", "run.device=cpu", "run.ckpt_every=1", "run.log_every=1", "model.model_channels=8",
        "model.head_dim=8", "model.num_groups=4", "model.emb_mult=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step digits teacher and a 2-step sCD student of it, trained through the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    teacher, scd = root / "teacher", root / "scd"
    assert cli.main(["train", "--preset", "digits-teacher", "--set", *TINY, "run.steps=2",
                     "--out", str(teacher), "--no-progress"]) == 0
    assert cli.main(["train", "--preset", "digits-scd", "--set", *TINY, "run.steps=2",
                     f"loss.teacher={teacher}", "loss.warmup_steps=1", "--out", str(scd),
                     "--no-progress"]) == 0
    return root


def test_train_writes_run_and_resumes(runs, capsys):
    teacher = runs / "teacher"
    assert (teacher / "config.json").is_file() and sorted(p.name for p in (teacher / "ckpt").glob("*.pt"))
    saved = json.loads((teacher / "config.json").read_text())
    assert saved["run"]["steps"] == 2 and saved["model"]["kwargs"]["model_channels"] == 8
    # --resume continues from the newest checkpoint up to the new run.steps
    code, out, err = _run(capsys, "train", "--preset", "digits-teacher", "--set", *TINY, "run.steps=3",
                          "--out", str(teacher), "--resume", "--no-progress")
    assert code == 0, err
    assert "3 steps (24 images)" in out


@pytest.mark.parametrize("run, steps, sampler", [("teacher", 2, "auto"), ("teacher", 2, "heun"),
                                                 ("scd", 1, "auto"), ("scd", 2, "auto"), ("scd", 3, "auto")])
def test_sample_writes_grid(runs, capsys, run, steps, sampler):
    from PIL import Image
    out = runs / f"{run}-{steps}-{sampler}.png"
    code, text, err = _run(capsys, "sample", "--ckpt", str(runs / run), "--steps", str(steps), "--n", "6",
                           "--sampler", sampler, "--out", str(out), "--nrow", "3", "--upscale", "2",
                           "--device", "cpu")
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (3 * 8 * 2, 2 * 8 * 2)
    nfe = 2 * steps - 1 if run == "teacher" else steps
    assert f"{steps} steps ({nfe} NFE)" in text


def test_sample_is_seeded_and_class_checked(runs, capsys):
    a, b, c = runs / "a.png", runs / "b.png", runs / "c.png"
    for path, seed in ((a, 0), (b, 0), (c, 1)):
        assert cli.main(["sample", "--ckpt", str(runs / "scd"), "--steps", "2", "--n", "4", "--class", "7",
                         "--seed", str(seed), "--out", str(path), "--device", "cpu"]) == 0
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    code, _, err = _run(capsys, "sample", "--ckpt", str(runs / "scd"), "--steps", "1", "--class", "10",
                        "--device", "cpu")
    assert code == 2 and "--class must be in [0, 9], got 10" in err


def test_eval_table_matches_direct_fid(runs, capsys, monkeypatch):
    # An untrained (seeded) digits classifier stands in for the cached one: this tests the CLI's plumbing,
    # the classifier itself is tested with scm.metrics.
    from scm import metrics
    from scm.data import DigitsDataset
    from scm.training import load_model
    torch.manual_seed(0)
    clf = metrics.DigitsClassifier().eval()
    monkeypatch.setattr(metrics, "digits_classifier", lambda cache_dir=None: clf)
    table = runs / "eval.md"
    code, out, err = _run(capsys, "eval", "--ckpt", str(runs / "scd"), "--n", "40", "--steps", "1,2",
                          "--device", "cpu", "--out", str(table))
    assert code == 0, err
    assert table.read_text() == out
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| consistency")]
    assert [r[1].strip() for r in rows] == ["1", "2"]
    model, cfg = load_model(runs / "scd", device="cpu")
    holdout = DigitsDataset("holdout")
    real = torch.stack([holdout[i][0] for i in range(len(holdout))])
    labels = torch.arange(40) % 10
    for r, steps in zip(rows, (1, 2)):
        img, _, _ = cli.generate(model, cfg, steps=steps, labels=labels, seed=0)
        fid = metrics.compute_fid(img, real, metrics.DigitsFeatures(clf))
        acc = metrics.class_accuracy(img, labels, clf)
        assert float(r[3]) == pytest.approx(fid, abs=1e-3) and float(r[4]) == pytest.approx(acc, abs=1e-3)


def test_generate_errors(runs):
    from scm.training import load_model
    model, cfg = load_model(runs / "scd", device="cpu")
    with pytest.raises(ValueError, match="class-conditional"):
        cli.generate(model, cfg, steps=1, n=4)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        cli.generate(model, cfg, steps=0, labels=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="sampler must be one of"):
        cli.generate(model, cfg, steps=1, labels=torch.zeros(4, dtype=torch.int64), sampler="euler")
    # the images do not depend on the batching
    lab = torch.arange(6) % 10
    x1, _, _ = cli.generate(model, cfg, steps=1, labels=lab, seed=3, batch=6)
    x2, _, _ = cli.generate(model, cfg, steps=1, labels=lab, seed=3, batch=4)
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-6)


def test_eval_rejects_non_digits_without_inception(runs, capsys, tmp_path):
    # a run trained on a 3-channel .npz cannot be scored with FID-digits
    import numpy as np
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "rgb"
    assert cli.main(["train", "--preset", "digits-teacher", "--set", *TINY, "run.steps=1", "data.source=npz",
                     f"data.path={npz}", "data.channels=3", "data.use_labels=false", "model.in_channels=3",
                     "model.num_classes=0", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "eval", "--ckpt", str(out), "--n", "8", "--device", "cpu")
    assert code == 2 and "FID-digits needs a checkpoint trained on the 1x8x8 digits" in err
