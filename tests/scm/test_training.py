"""scm.training: resume equals the uninterrupted run bit for bit, SIGTERM leaves a loadable checkpoint,
2-rank gloo DDP equals 1 rank with the same global batch, the NaN/Inf guard, gradient accumulation,
checkpoint and config checks. Tiny settings (batch 16, a few steps of the digits U-Net)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from scm import training
from scm.config import get_preset

REPO = Path(__file__).resolve().parents[2]
TINY = ["run.batch_size=16", "run.log_every=1", "run.ckpt_every=2", "model.model_channels=16", "model.head_dim=16"]


def _cfg(preset: str, steps: int, *extra: str):
    return get_preset(preset).override([*TINY, f"run.steps={steps}", *extra])


def _params(path) -> dict:
    return training._load_state(path)[0]["model"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    res = training.train(_cfg("digits-teacher", 4), out, progress=False)
    assert res.step == 4 and len(res.losses) == 4
    return out


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["teacher", "sct", "scd"])
def test_resume_equals_uninterrupted_bitwise(tmp_path, teacher_run, kind):
    extra = [] if kind == "teacher" else [f"loss.teacher={teacher_run}", "loss.warmup_steps=3"]
    preset = f"digits-{kind}"
    full = training.train(_cfg(preset, 5, *extra), tmp_path / "full", progress=False)
    first = training.train(_cfg(preset, 2, *extra), tmp_path / "split", progress=False)
    second = training.train(_cfg(preset, 5, *extra), tmp_path / "split", resume=True, progress=False)
    assert first.step == 2 and second.step == 5
    assert first.losses + second.losses == full.losses  # exact float equality
    a = training._load_state(tmp_path / "full")[0]
    b = training._load_state(tmp_path / "split")[0]
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(training.load_model(tmp_path / "full")[0].state_dict(),
                       training.load_model(tmp_path / "split")[0].state_dict())  # the EMA
    # metrics.csv of the resumed run has each step once
    steps = [int(r.split(",")[0]) for r in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]


def test_channels_last_and_pass_modes_train_alike(tmp_path, teacher_run):
    """sCT from the teacher with model.channels_last=true, and with loss.passes=separate: the same losses
    and weights as the default run (NCHW, merged passes) up to rounding; the channels-last run's
    checkpoint and safetensors export load into an NCHW network."""
    extra = [f"loss.teacher={teacher_run}", "loss.warmup_steps=3"]
    runs = {name: training.train(_cfg("digits-sct", 3, *extra, *opts), tmp_path / name, progress=False)
            for name, opts in (("default", []), ("cl", ["model.channels_last=true"]),
                               ("separate", ["loss.passes=separate"]))}
    base = runs["default"].losses
    for name in ("cl", "separate"):
        assert torch.allclose(torch.tensor(runs[name].losses), torch.tensor(base), rtol=1e-4, atol=1e-7), name
        a, b = _params(tmp_path / name), _params(tmp_path / "default")
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
    net, cfg = training.load_model(tmp_path / "cl")
    assert net.channels_last and cfg.model.kwargs["channels_last"] is True
    plain, _ = training.load_model(tmp_path / "default")
    plain.load_state_dict(net.state_dict())  # a channels-last state dict loads into an NCHW network
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.7)
    y = torch.tensor([1, 2])
    torch.testing.assert_close(plain(x, t, class_labels=y), net(x, t, class_labels=y), rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_changed_config(tmp_path):
    training.train(_cfg("digits-teacher", 1), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"optim\.lr"):
        training.train(_cfg("digits-teacher", 2, "optim.lr=0.5"), tmp_path, resume=True, progress=False)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = training.train(_cfg("digits-teacher", 1), tmp_path, resume=True, progress=False)
    assert res.step == 1


def test_grad_accumulation_matches_one_batch(tmp_path):
    a = training.train(_cfg("digits-teacher", 3), tmp_path / "a", progress=False)
    b = training.train(_cfg("digits-teacher", 3, "run.grad_accum=4"), tmp_path / "b", progress=False)
    assert torch.allclose(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)


def test_nonfinite_gradient_skips_the_step(tmp_path, monkeypatch):
    build = training.build_network
    calls = {"n": 0}

    def poisoned(cfg, device=None):
        model = build(cfg, device)
        p = next(model.parameters())

        def hook(g):
            calls["n"] += 1
            return torch.full_like(g, float("nan")) if calls["n"] == 2 else g
        p.register_hook(hook)
        return model

    monkeypatch.setattr(training, "build_network", poisoned)
    res = training.train(_cfg("digits-teacher", 3), tmp_path, progress=False)
    assert res.skipped == 1 and res.nimg == 2 * 16
    state = training._load_state(tmp_path)[0]
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[2].split(",")[5] == "1"  # the skipped column of step 2


def test_load_model_variants(tmp_path, teacher_run):
    m, cfg = training.load_model(teacher_run)
    assert not m.training and cfg.name == "digits-teacher"
    raw, _ = training.load_model(teacher_run, which="model")
    assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), raw.state_dict().values()))
    with pytest.raises(ValueError, match="power"):
        training.load_model(teacher_run, which="power:0.05")
    with pytest.raises(ValueError, match="which"):
        training.load_model(teacher_run, which="best")
    weights = teacher_run / "weights.safetensors"
    from safetensors.torch import load_file
    w = load_file(str(weights))
    for k, v in m.state_dict().items():
        assert torch.equal(w[k], v)


def test_power_ema_run_and_snapshots(tmp_path):
    cfg = _cfg("digits-teacher", 4, "ema.halflife_kimg=0", "ema.power_stds=0.05,0.1", "ema.snapshot_every=2")
    training.train(cfg, tmp_path, progress=False)
    m, _ = training.load_model(tmp_path, which="power:0.1")
    assert sorted(p.name for p in (tmp_path / "power_ema").iterdir()) == ["snap-000000002.pt", "snap-000000004.pt"]
    with pytest.warns(UserWarning, match="no EMA"):
        training.load_model(tmp_path, which="ema")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from scm.config import get_preset
    from scm import training
    torch.set_num_threads(1)
    out, preset, steps, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    cfg = get_preset(preset).override(extra + [f"run.steps={steps}"])
    training.train(cfg, out, progress=False)
""")


@pytest.mark.parametrize("kind,parallel", [("teacher", "ddp"), ("sct", "ddp"), ("sct", "fsdp")])
def test_ddp_two_gloo_ranks_equal_one_rank(tmp_path, teacher_run, kind, parallel):
    """2 gloo ranks (DDP, or FSDP2 with the per-layer JVP) == 1 rank with the same global batch."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    extra = list(TINY) + ([] if kind == "teacher" else [f"loss.teacher={teacher_run}", "loss.warmup_steps=2"])
    extra += [f"run.parallel={parallel}"] + (["loss.jvp=layer", "run.grad_accum=2"] if parallel == "fsdp" else [])
    steps = 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script), str(tmp_path / "two"), f"digits-{kind}", str(steps), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    one = training.train(_cfg(f"digits-{kind}", steps, *extra[len(TINY):]), tmp_path / "one", progress=False)
    two_state = training._load_state(tmp_path / "two")[0]
    assert two_state["world_size"] == 2 and two_state["step"] == steps
    one_state = training._load_state(tmp_path / "one")[0]
    # Same global batch, same t and z: equal up to the order of the gradient sums (fp32 rounding).
    for k, v in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][k], v, rtol=2e-4, atol=2e-6, msg=k)
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()[1:]
    losses_two = [float(r.split(",")[2]) for r in rows]
    torch.testing.assert_close(torch.tensor(losses_two, dtype=torch.float64),
                               torch.tensor(one.losses, dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "long_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), str(out), "digits-teacher", "100000", *TINY, "run.ckpt_every=0"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = out / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and (not csv.exists() or len(csv.read_text().splitlines()) < 3):
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-3000:]
    assert "stopped by signal" in stdout
    state = training._load_state(out)[0]
    assert 2 <= state["step"] < 100000
    m, cfg = training.load_model(out)
    assert json.loads((out / "config.json").read_text())["name"] == cfg.name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, teacher_run, precision):
    """bf16 autocast, and fp16 with a gradient scaler (whose state is checkpointed), for the teacher and sCT."""
    for kind in ("teacher", "sct"):
        extra = [f"run.precision={precision}"] + ([] if kind == "teacher" else [f"loss.teacher={teacher_run}"])
        res = training.train(_cfg(f"digits-{kind}", 2, *extra), tmp_path / kind, progress=False)
        assert all(torch.isfinite(torch.tensor(res.losses))), res.losses
        state = training._load_state(tmp_path / kind)[0]
        assert (state["scaler"] is not None) == (precision == "fp16")
