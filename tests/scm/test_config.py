"""Tests of scm.config: every preset validates and round-trips through JSON, overrides parse by the
field annotations (and by the network's signature for model.<x>), and each rejected configuration
raises with a message naming the offending key."""

from __future__ import annotations

import json

import pytest

from scm import networks
from scm.config import PRESETS, Config, DataConfig, EMAConfig, ModelConfig, RunConfig, describe, get_preset

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_roundtrip_describe(name):
    cfg = get_preset(name)
    assert cfg.name == name
    cfg.validate()
    d = cfg.to_dict()
    back = Config.from_dict(json.loads(json.dumps(d)))  # JSON lists come back as tuples
    assert back == cfg
    assert back.to_dict() == d
    text = describe(cfg)
    n = networks.count_parameters(networks.create(cfg.model.preset, device="meta", **cfg.model.kwargs))
    assert f"{n:,} parameters" in text and cfg.model.preset in text and name in text
    assert get_preset(name) is not get_preset(name)  # a fresh object each time


def test_required_presets_and_paper_settings():
    assert {"digits-teacher", "digits-sct", "digits-scd", "cifar10-teacher", "cifar10-sct",
            "imagenet64-scd"} <= set(PRESETS)
    c = get_preset("cifar10-sct")
    assert (c.optim.name, c.optim.lr, c.optim.betas, c.optim.eps) == ("radam", 1e-4, (0.9, 0.99), 1e-8)
    assert (c.ema.halflife_kimg, c.run.batch_size) == (500.0, 512)
    assert (c.loss.proposal, c.loss.warmup_steps) == ("cifar10", 10000)
    assert c.model.preset == "cifar10-ncsnpp-deep" and c.model.kwargs["dropout"] == 0.2
    i = get_preset("imagenet64-scd")
    assert (i.optim.name, i.optim.betas, i.optim.eps) == ("adam", (0.9, 0.99), 1e-11)
    assert i.optim.schedule == "inv_sqrt"
    assert 0.05 in i.ema.power_stds and i.run.batch_size == 2048 and i.loss.proposal == "imagenet64"
    assert i.model.preset.startswith("imagenet64-") and i.loss.kind == "scd" and i.loss.teacher
    dg = get_preset("digits-teacher")
    assert (dg.model.preset, dg.model.kwargs["num_classes"], dg.data.source, dg.data.resolution,
            dg.data.channels) == ("demo-digits8", 10, "digits", 8, 1)


def test_override_parses_by_annotation():
    base = get_preset("digits-sct")
    c = base.override(["optim.lr=2e-4", "run.steps=100", "model.dropout=0.1", "optim.betas=0.9,0.999",
                       "loss.teacher=none", "data.hflip=1", "loss.weighting=False", "ema.rampup_ratio=NULL",
                       "model.channel_mult=1,2", "ema.power_stds=0.05", "name=mine", "run.backend=reference"])
    assert c.optim.lr == 2e-4 and isinstance(c.optim.lr, float)
    assert c.run.steps == 100 and isinstance(c.run.steps, int)
    assert c.model.kwargs == {"num_classes": 10, "time_scale": 10.0, "channels_last": True, "dropout": 0.1,
                              "channel_mult": (1, 2)}
    assert c.optim.betas == (0.9, 0.999)
    assert c.loss.teacher is None and c.data.hflip is True and c.loss.weighting is False
    assert c.ema.rampup_ratio is None and c.ema.power_stds == (0.05,) and c.name == "mine"
    assert c.run.backend == "reference"
    c.validate()
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # kwargs lists back to tuples
    # a new object: the base is untouched
    assert base.optim.lr == get_preset("digits-sct").optim.lr != c.optim.lr
    assert base.loss.teacher == "runs/digits-teacher"
    assert "dropout" not in base.model.kwargs
    assert base.override(["ema.power_stds="]).ema.power_stds == ()
    assert base.override(["ema.power_stds=(0.05, 0.1)"]).ema.power_stds == (0.05, 0.1)


@pytest.mark.parametrize("assignment, match", [
    ("optim.learning_rate=1", r"unknown key 'optim.learning_rate'.*'lr'"),
    ("optimizer.lr=1", r"unknown key 'optimizer.lr'"),
    ("lr=1", r"unknown key 'lr'"),
    ("optim.lr", r"expected 'key=value'"),
    ("optim.lr=fast", r"optim.lr='fast': expected a float"),
    ("run.steps=1.5", r"run.steps='1.5': expected an int"),
    ("data.hflip=maybe", r"data.hflip='maybe': expected a bool"),
    ("optim.betas=0.9,,0.99", r"optim.betas.*empty element"),
    ("model.not_a_param=3", r"'not_a_param' is not a parameter of UNet.*valid: .*dropout"),
    ("model.dropout=lots", r"model.dropout='lots': expected a float"),
    ("model.kwargs=1", r"'kwargs' is not a parameter of UNet"),
])
def test_override_errors(assignment, match):
    with pytest.raises(ValueError, match=match):
        get_preset("digits-teacher").override([assignment])


def test_override_model_param_follows_preset():
    # demo-dit is a DiT: patch_size is one of its parameters, not of the U-Net
    c = get_preset("digits-teacher").override(["model.preset=demo-dit", "model.patch_size=4"])
    assert c.model.kwargs["patch_size"] == 4
    with pytest.raises(ValueError, match="not a parameter of UNet"):
        get_preset("digits-teacher").override(["model.patch_size=4"])


def test_from_dict_strict():
    d = get_preset("digits-teacher").to_dict()
    with pytest.raises(ValueError, match=r"unknown key 'optim.learning_rate'; valid keys of 'optim'.*'lr'"):
        Config.from_dict({**d, "optim": {**d["optim"], "learning_rate": 1.0}})
    with pytest.raises(ValueError, match=r"unknown key 'trainer'"):
        Config.from_dict({**d, "trainer": {}})
    with pytest.raises(TypeError, match=r"run.steps: expected an int, got '100'"):
        Config.from_dict({**d, "run": {**d["run"], "steps": "100"}})
    with pytest.raises(TypeError, match=r"data.use_labels: expected a bool"):
        Config.from_dict({**d, "data": {**d["data"], "use_labels": 1}})
    with pytest.raises(TypeError, match=r"optim.betas: expected a comma list of float"):
        Config.from_dict({**d, "optim": {**d["optim"], "betas": 0.9}})
    with pytest.raises(TypeError, match=r"section 'run' must be a dict"):
        Config.from_dict({**d, "run": 3})
    with pytest.raises(ValueError, match=r"'depth' is not a parameter of UNet"):
        Config.from_dict({**d, "model": {"preset": "demo-digits8", "kwargs": {"depth": 3}}})
    # missing keys take defaults; ints are accepted for floats
    c = Config.from_dict({"name": "x", "optim": {"lr": 1}})
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.run == RunConfig() and c.model == ModelConfig()


def _bad(*assignments, preset="digits-teacher"):
    return get_preset(preset).override(list(assignments))


@pytest.mark.parametrize("assignments, match", [
    (("model.preset=nope",), r"unknown network preset model.preset='nope'"),
    (("data.resolution=16",), r"data.resolution=16 does not match the network's img_resolution=8"),
    (("data.resolution=9", "model.img_resolution=9"), r"data.resolution=9 must be divisible by .* factor 2"),
    (("model.preset=demo-dit", "data.resolution=15", "model.img_resolution=15"),
     r"data.resolution=15 must be divisible by .* factor 2 = the patch_size of DiT"),
    (("data.channels=3",), r"data.channels must be 1 for the digits"),
    (("data.source=npz", "data.path=x.npz", "data.channels=3"),
     r"data.channels=3 does not match the network's in_channels=1"),
    (("model.out_channels=2",), r"out_channels=2 must equal in_channels=1"),
    (("data.use_labels=false",), r"class-conditional \(num_classes=10\) but data.use_labels is false"),
    (("model.num_classes=5",), r"digits have 10 classes but the network has num_classes=5"),
    (("data.source=folder",), r"data.path is required for data.source='folder'"),
    (("data.source=web",), r"data.source must be one of"),
    (("loss.kind=scd", "loss.teacher=none"), r"loss.kind='scd' needs a teacher"),
    (("loss.teacher=runs/t",), r"only used by sct/scd"),
    (("loss.kind=ddpm",), r"loss.kind must be one of \['teacher', 'sct', 'scd'\], got 'ddpm'"),
    (("loss.proposal=celeba",), r"loss.proposal .* got 'celeba'"),
    (("loss.jvp=reverse",), r"loss.jvp must be one of"),
    (("loss.sigma_d=0",), r"loss.sigma_d must be > 0"),
    (("loss.tangent_norm_c=0",), r"loss.tangent_norm_c must be > 0"),
    (("loss.guidance=2",), r"loss.guidance=2.0 .* needs loss.kind='scd'"),
    (("loss.kind=scd", "loss.teacher=t", "loss.guidance=2"), r"set model.guidance_input=true"),
    (("optim.name=sgd",), r"optim.name must be one of \['radam', 'adam'\], got 'sgd'"),
    (("optim.schedule=cosine",), r"optim.schedule must be one of"),
    (("optim.lr=0",), r"optim.lr must be > 0"),
    (("optim.betas=0.9",), r"optim.betas must be two numbers"),
    (("optim.betas=0.9,1.0",), r"optim.betas must be two numbers"),
    (("optim.grad_clip=-1",), r"optim.grad_clip must be > 0"),
    (("ema.power_stds=0.3",), r"ema.power_stds: every sigma_rel must be in"),
    (("ema.snapshot_every=10",), r"ema.snapshot_every > 0 needs ema.power_stds"),
    (("ema.halflife_kimg=-1",), r"ema.halflife_kimg must be >= 0"),
    (("run.precision=fp8",), r"run.precision must be one of \['fp32', 'bf16', 'fp16'\], got 'fp8'"),
    (("run.batch_size=128", "run.grad_accum=3"), r"run.batch_size=128 must be divisible by run.grad_accum=3"),
    (("run.steps=0",), r"run.steps must be >= 1"),
    (("run.backend=fast",), r"run.backend must be one of"),
    (("run.device=gpu0",), r"run.device must be 'auto' or a torch device"),
    (("run.keep_last=0",), r"run.keep_last must be >= 1"),
    (("model.num_groups=5",), r"network of preset 'demo-digits8' .* cannot be built: .*num_groups"),
    (("model.attn_resolutions=2",), r"cannot be built: .*attn_resolution 2"),
])
def test_validate_rejects(assignments, match):
    cfg = _bad(*assignments)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_validate_accepts_documented_cases():
    # unconditional network with labels loaded (labels serve class accuracy only): allowed
    _bad("model.num_classes=0").validate()
    # sCT without a teacher starts from scratch: allowed
    _bad("loss.teacher=none", preset="digits-sct").validate()
    # grad_accum dividing the batch; a change of network consistent with the data
    _bad("run.grad_accum=4", "model.preset=demo-16", "data.resolution=16").validate()
    _bad("loss.kind=scd", "loss.teacher=t", "loss.guidance=2", "model.guidance_input=true").validate()


def test_validate_checks_types_of_direct_construction():
    cfg = Config("x", ModelConfig(), DataConfig(resolution="8"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"data.resolution: expected an int"):
        cfg.validate()
    cfg = Config("x", ema=EMAConfig(power_stds="0.05"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ema.power_stds: expected a comma list of float"):
        cfg.validate()


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'digits'; presets: \['digits-teacher'"):
        get_preset("digits")
