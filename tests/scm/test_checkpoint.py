"""Tests of scm.checkpoint: atomic saves that survive SIGKILL, weights_only loading that refuses (and never
runs) pickled code, clear errors for truncated/corrupt files with fall-back to the previous checkpoint,
keep_last pruning, and the safetensors export."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from scm.checkpoint import (CheckpointError, CheckpointManager, export_safetensors, load_checkpoint,
                            save_atomic)

pytestmark = pytest.mark.reference
REPO = Path(__file__).resolve().parents[2]


def _assert_same(a, b, where="state"):
    """Recursive equality: same container types, same keys, tensors bitwise equal with the same dtype."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _realistic_state(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        loss = model(torch.randn(5, 1, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"format": "scm-ckpt-1", "step": 2, "nimg": 10, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": None},
            "data": {"epoch": 0, "pos": 10, "seed": 0}, "scaler": None,
            "metrics": {"loss": [0.5, 0.25], "nan_skips": 0, "ok": True, "shape": (3, 4),
                        "nested": {"a": [1, {"b": torch.arange(3)}]}}}


def test_round_trip_realistic_state(tmp_path):
    """Model / optimizer state dicts, the RNG state and nested plain containers come back bitwise equal,
    and no temporary file stays behind."""
    state = _realistic_state()
    p = save_atomic(state, tmp_path / "sub" / "a.pt")
    assert p == tmp_path / "sub" / "a.pt" and p.is_file()
    back = load_checkpoint(p)
    _assert_same(state, back)
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.pt"]
    # the restored RNG state reproduces the same draws
    torch.set_rng_state(back["rng"]["torch"])
    a = torch.rand(4)
    torch.set_rng_state(state["rng"]["torch"])
    assert torch.equal(a, torch.rand(4))


def test_save_rejects_objects_weights_only_cannot_load(tmp_path):
    class Thing:
        pass

    class Flag(int):
        pass

    cases = [({"a": {"b": [1, Thing()]}}, "obj['a']['b'][1]"), ({"f": lambda: 0}, "obj['f']"),
             ({"n": [Flag(3)]}, "obj['n'][0]")]
    for bad, where in cases:
        with pytest.raises(TypeError, match=re.escape(where)):
            save_atomic(bad, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="must be a dict"):
        save_atomic([torch.zeros(1)], tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


class _Payload:
    """Unpickling this runs os.makedirs(marker): a stand-in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    zip_ckpt = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, zip_ckpt)
    raw2, raw5 = tmp_path / "evil2.pkl", tmp_path / "evil5.pkl"  # bare pickles, protocols 2 and 5
    raw2.write_bytes(pickle.dumps({"extra": _Payload(marker)}, protocol=2))
    raw5.write_bytes(pickle.dumps({"extra": _Payload(marker)}, protocol=5))
    for path in (zip_ckpt, raw2, raw5):
        with pytest.raises(CheckpointError, match="refused") as ei:
            load_checkpoint(path)
        assert str(path) in str(ei.value) and "nothing in it was executed" in str(ei.value)
        if path != raw5:  # protocol 5 is refused at its first FRAME opcode, before the global is read
            assert "os.makedirs" in str(ei.value)
        assert not marker.exists()
    # the manager refuses it as well (one warning, then the earlier good checkpoint)
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save({"step": 1}, 1)
    (tmp_path / "run" / "ckpt-000000002.pt").write_bytes(zip_ckpt.read_bytes())
    with pytest.warns(RuntimeWarning, match="ckpt-000000002.pt"):
        state, path = mgr.load_latest()
    assert state == {"step": 1} and path.name == "ckpt-000000001.pt" and not marker.exists()
    # control: the payload is real: an unsafe load does run it
    torch.load(zip_ckpt, weights_only=False)
    assert marker.is_dir()


def test_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.pt"
    save_atomic({"w": torch.arange(100_000, dtype=torch.float32), "s": "x"}, good)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the tensor bytes: torch.load alone would not notice
    cases = {"half.pt": data[: len(data) // 2], "empty.pt": b"", "text.pt": b"not a checkpoint",
             "cut.pt": data[:-10], "flip.pt": bytes(flipped)}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated or corrupt|corrupt") as ei:
            load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(ei.value), name
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_manager_falls_back_past_a_truncated_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (100, 200, 300):
        mgr.save({"step": step, "w": torch.full((1000,), float(step))}, step)
    newest = mgr.paths()[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        state, path = mgr.load_latest()
    assert len(rec) == 1 and "ckpt-000000300.pt" in str(rec[0].message)
    assert path.name == "ckpt-000000200.pt" and state["step"] == 200 and torch.all(state["w"] == 200)
    # two broken newest files: still ONE warning naming both
    mgr.paths()[-2].write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        state, path = mgr.load_latest()
    assert len(rec) == 1 and "000000300" in str(rec[0].message) and "000000200" in str(rec[0].message)
    assert state["step"] == 100
    # nothing loadable: a clear error rather than silently starting over; no files at all: None
    mgr.paths()[0].write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        mgr.load_latest()
    assert CheckpointManager(tmp_path / "empty").load_latest() is None


def test_manager_keep_last_names_and_stale_temp_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, prefix="run")
    for step in (5, 10, 1_000_000_000, 20):  # a 10-digit step sorts by value, not by name
        mgr.save({"step": step}, step)
    assert [p.name for p in mgr.paths()] == ["run-000000020.pt", "run-1000000000.pt"]
    # keep_last never deletes the file just written, even when it is older than the others
    mgr.save({"step": 7}, 7)
    assert [p.name for p in mgr.paths()] == ["run-000000007.pt", "run-000000020.pt", "run-1000000000.pt"]
    # a reader's manager touches nothing; the next save removes temp files of interrupted saves
    (tmp_path / ".run-000000030.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "unrelated.txt").write_text("keep me")
    reader = CheckpointManager(tmp_path / "not-yet", keep_last=2, prefix="run")
    assert reader.paths() == [] and reader.load_latest() is None and not (tmp_path / "not-yet").exists()
    assert (tmp_path / ".run-000000030.pt.abc123.tmp").exists()
    mgr.save({"step": 40}, 40)
    assert not (tmp_path / ".run-000000030.pt.abc123.tmp").exists() and (tmp_path / "unrelated.txt").exists()
    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in range(5):
        keep_all.save({"step": step}, step)
    assert len(keep_all.paths()) == 5
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="keep_last"):
            CheckpointManager(tmp_path, keep_last=bad)
    with pytest.raises(ValueError, match="step"):
        mgr.save({}, -3)


# Imports torch once, then for each path read on stdin forks a writer that saves a 200 MB tensor to that
# path in a loop (generation 1, 2, ...) until it is killed; the server reaps it and says so.
_WRITER = textwrap.dedent("""
    import os, sys, torch
    from scm.checkpoint import save_atomic
    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            x = torch.empty(50_000_000)
            gen = 1
            while True:
                x.fill_(float(gen))
                print("begin", gen, flush=True)
                save_atomic({"gen": gen, "x": x}, line.strip())
                print("end", gen, flush=True)
                gen += 1
        print("child", pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
""")


def _read_until(proc, words):
    while True:
        line = proc.stdout.readline()
        assert line, "the writer exited early"
        if line.split()[: len(words)] == words:
            return line.split()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer forks")
def test_sigkill_during_a_large_save_never_breaks_the_checkpoint(tmp_path):
    """A writer saves a 200 MB tensor to the same path in a loop; it is SIGKILLed at different moments of
    a save (0 to 0.3 s after a save began; one save takes ~0.2-0.8 s here). Each time the path holds either
    the first small checkpoint or one complete generation (all 200 MB equal to its generation number), and
    at least one kill did land mid-write (it left a stray temp file)."""
    path = tmp_path / "ckpt.pt"
    save_atomic({"gen": 0, "x": torch.zeros(4)}, path)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    interrupted = 0
    seen_gens = set()
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        for target, delay in ((1, 0.0), (1, 0.03), (2, 0.1), (1, 0.3), (2, 0.0)):
            proc.stdin.write(f"{path}\n")
            proc.stdin.flush()
            pid = int(_read_until(proc, ["child"])[1])
            _read_until(proc, ["begin", str(target)])
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _read_until(proc, ["reaped"])
            state = load_checkpoint(path)
            gen = state["gen"]
            assert gen == 0 or (state["x"].numel() == 50_000_000 and bool((state["x"] == gen).all()))
            seen_gens.add(gen)
            temps = list(tmp_path.glob(".ckpt.pt.*.tmp"))
            interrupted += bool(temps)
            for t in temps:
                t.unlink()
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert interrupted >= 1, "no kill landed inside a save: the test did not exercise its case"
    assert seen_gens - {0}, "no save ever completed"


def test_export_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    lin = nn.Linear(6, 6)
    emb = nn.Embedding(6, 6)
    emb.weight = lin.weight  # tied weights share storage
    sd = {**{f"lin.{k}": v for k, v in lin.state_dict().items()}, "emb.weight": emb.weight,
          "t": torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # non-contiguous
          "h": torch.randn(3, dtype=torch.bfloat16)}
    meta = {"format": "scm-weights-1", "config": '{"name": "x"}'}
    p = export_safetensors(sd, tmp_path / "w.safetensors", metadata=meta)
    back = load_file(p)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v.detach()), k
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == meta
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.safetensors"]
    with pytest.raises(TypeError, match="'nested'"):
        export_safetensors({"nested": {"a": torch.zeros(1)}}, tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="metadata"):
        export_safetensors({"a": torch.zeros(1)}, tmp_path / "bad.safetensors", metadata={"step": 3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_errors_unrelated_to_the_file_are_not_called_corruption(tmp_path):
    save_atomic({"w": torch.zeros(3)}, tmp_path / "a.pt")
    with pytest.raises(RuntimeError) as ei:
        load_checkpoint(tmp_path / "a.pt", map_location="cuda")
    assert not isinstance(ei.value, CheckpointError)
