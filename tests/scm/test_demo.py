"""`scm demo` end to end in miniature: three runs, six samplers, the output folder and its table.
(The real budgets are run by the README's first command; this checks the plumbing.)"""

from __future__ import annotations

import json

import torch

from scm import demo, metrics
from scm.metrics import DigitsClassifier

TINY = ("run.batch_size=8", "model.model_channels=8", "model.head_dim=8", "model.num_groups=4",
        "model.emb_mult=1", "run.ckpt_every=0")


def test_demo_miniature(tmp_path, monkeypatch):
    torch.manual_seed(0)
    clf = DigitsClassifier().eval().requires_grad_(False)  # untrained stand-in: plumbing, not quality
    monkeypatch.setattr(metrics, "digits_classifier", lambda cache_dir=None: clf)
    budget = demo.Budget(teacher_steps=3, scd_steps=2, sct_steps=2, samples=30, ode_steps=3,
                         sct_overrides=("optim.lr=3e-4", "run.batch_size=16"))
    res = demo.main(tmp_path, budget=budget, overrides=TINY, progress=False)
    # the budget's sCT settings apply to sCT only, and the caller's overrides win over them
    sct_cfg = json.loads((tmp_path / "sct" / "config.json").read_text())
    assert sct_cfg["optim"]["lr"] == 3e-4 and sct_cfg["run"]["batch_size"] == 8
    assert json.loads((tmp_path / "scd" / "config.json").read_text())["optim"]["lr"] != 3e-4
    names = [r["sampler"] for r in res["rows"]]
    assert names == ["real digits (train split)", "teacher DPM-Solver-2, 3 steps", "teacher DPM-Solver-2, 2 steps",
                     "sCD 1-step", "sCD 2-step", "sCT 1-step", "sCT 2-step"]
    assert [r["nfe"] for r in res["rows"]] == [0, 5, 3, 1, 2, 1, 2]
    for r in res["rows"]:
        assert r["fid"] >= 0 and 0 <= r["acc"] <= 1
    for f in ("results.md", "results.json", "loss.png"):
        assert (tmp_path / f).stat().st_size > 0
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert len(grids) == 6 and all(g.endswith(".png") for g in grids)
    assert set(json.loads((tmp_path / "results.json").read_text())["targets"]) == {"sCD", "sCT"}
    table = (tmp_path / "results.md").read_text()
    assert "| sCD 2-step | 2 |" in table and "FID ratio" in table
    # a second call resumes the finished runs instead of training again
    demo.main(tmp_path, budget=budget, overrides=TINY, progress=False)
    rows = (tmp_path / "teacher" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["3"]
