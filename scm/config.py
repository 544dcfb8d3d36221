"""Run configurations of scm: dataclasses, named presets, ``key=value`` overrides and validation.

A run is one :class:`Config` (EDM2's habit: named presets plus overrides, no framework):

    cfg = get_preset("digits-teacher").override(["optim.lr=2e-4", "run.steps=100", "model.dropout=0.1"])
    cfg.validate()          # ValueError before anything trains
    print(describe(cfg))    # preset, network, parameter count (meta device), data, loss, optimizer

Sections: model (a network preset of scm.networks plus keyword overrides), data, loss (teacher = the
TrigFlow diffusion loss A4; sct / scd = Algorithm 1, A12-A18), optim (A19), ema, run. Every field is
JSON-able (tuples stay tuples in ``to_dict()``; ``from_dict`` turns JSON lists back into tuples).

Override syntax (``Config.override``): ``section.field=value`` parsed by the field's annotation:
    int / float         "2e-4", "100"
    bool                true / false / 1 / 0 (any case)
    str | None          "none" or "null" (any case) -> None, anything else the string itself
    tuple[float, ...]   a comma list "0.9,0.999"; "" or "()" -> ()
    model.<name>        a keyword of the preset's network class (UNet / DiT) __init__, checked with
                        inspect.signature and parsed by that parameter's annotation
                        ("model.channel_mult=1,2,2").

Decisions documented here (validate() enforces them):
- Labels: they are fed to the network only when it is class-conditional (num_classes > 0).
  ``num_classes = 0`` with ``data.use_labels = True`` is allowed (an unconditional network; the labels
  still serve the class-accuracy metric). ``num_classes > 0`` with ``use_labels = False`` is an error:
  the network would only ever see its null label. For the digits (10 classes) a conditional network
  needs num_classes >= 10.
- ``loss.teacher`` is a path (checkpoint file or run directory). validate() does not touch the
  filesystem: a missing path is reported by the training loop when it loads the teacher, still before
  the first step. scd needs a teacher; sct without one starts from scratch (init_from_teacher then has
  nothing to do); a teacher run (kind "teacher") must not name one.
- Presets that train on data not shipped here (cifar10-*, imagenet64-scd) point ``data.path`` at
  ``data/cifar10`` / ``data/imagenet64`` (image folders): set ``--set data.path=...``. The sCT / sCD
  presets point ``loss.teacher`` at the default output folder of the matching teacher preset
  (``runs/<teacher preset>``, the default ``scm train --out``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PRESETS", "Config", "DataConfig", "EMAConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "describe", "get_preset",
]

DATA_SOURCES = ("digits", "folder", "npz")
LOSS_KINDS = ("teacher", "sct", "scd")
JVP_MODES = ("auto", "func", "layer")
PASSES = ("auto", "merged", "separate")
OPTIMIZERS = ("radam", "adam")
SCHEDULES = ("constant", "inv_sqrt")
PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
DIGITS_CLASSES = 10
# EDM2 power EMA: sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))) is sqrt(1/12) at gamma = 0; gamma > 0
# (an average that forgets) needs sigma_rel below that.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


@dataclass
class ModelConfig:
    """The network: a preset of scm.networks.PRESETS and keyword overrides of its class's __init__."""
    preset: str = "demo-digits8"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training images (scm.data.build_dataset): the embedded digits, an image folder or an .npz file."""
    source: str = "digits"
    path: str | None = None
    resolution: int = 8
    channels: int = 1
    use_labels: bool = True
    hflip: bool = False


@dataclass
class LossConfig:
    """teacher: TrigFlow diffusion loss (A4); sct / scd: the sCM loss of Algorithm 1 (A12-A18).
    p_mean / p_std override the time proposal (A9) named by ``proposal``."""
    kind: str = "teacher"
    teacher: str | None = None
    init_from_teacher: bool = True
    sigma_d: float = 0.5
    proposal: str = "cifar10"
    p_mean: float | None = None
    p_std: float | None = None
    weighting: bool = True
    warmup_steps: int = 10000
    tangent_norm_c: float | None = 0.1
    jvp: str = "auto"
    passes: str = "auto"  # SCMLoss's passes: "auto", "merged" or "separate" (scm.losses)
    semi_continuous: bool = False
    guidance: float | None = None


@dataclass
class OptimConfig:
    """RAdam / Adam (A19); schedule inv_sqrt is EDM2's lr / sqrt(max(step / ref_steps, 1)); a linear
    warm-up over rampup_steps; gradient-norm clipping at grad_clip."""
    name: str = "radam"
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    ref_steps: int = 70000
    rampup_steps: int = 0
    grad_clip: float | None = None


@dataclass
class EMAConfig:
    """Plain EMA with a half-life in thousands of images (0 disables it; EDM ramp-up optional) and
    EDM2 power-function EMAs, one per sigma_rel in power_stds, snapshotted every snapshot_every steps."""
    halflife_kimg: float = 500.0
    rampup_ratio: float | None = None
    power_stds: tuple[float, ...] = ()
    snapshot_every: int = 0


@dataclass
class RunConfig:
    """Global batch (split into grad_accum micro-batches), length, precision, seed, device, kernels
    backend, checkpoint and logging intervals (in steps), and how several ranks (torchrun) share the
    work: "ddp" (replicated model, DistributedDataParallel) or "fsdp" (FSDP2 fully_shard per block,
    scm.distributed; the JVP pass gathers one block at a time)."""
    batch_size: int = 128
    grad_accum: int = 1
    steps: int = 2000
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    backend: str | None = None
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    parallel: str = "ddp"


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig,
                              "optim": OptimConfig, "ema": EMAConfig, "run": RunConfig}


@dataclass
class Config:
    """One run: a name (the preset it came from) and the six sections."""
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # --- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A plain nested dict (tuples stay tuples; json.dumps writes them as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """The Config of ``to_dict()`` output (or its JSON round trip). Strict: an unknown section or key
        is a ValueError naming it and listing the valid ones; a value of the wrong type is a TypeError
        naming the key. Missing keys take their defaults. model.kwargs are checked against the
        preset's network class when the preset is known (validate() checks the preset itself)."""
        if not isinstance(d, dict):
            raise TypeError(f"Config.from_dict: expected a dict, got {type(d).__name__}")
        valid = ["name", *_SECTIONS]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(f"Config.from_dict: unknown key {unknown[0]!r}; valid keys: {valid}")
        name = _check_value(d.get("name", "custom"), str, "name")
        sections = {}
        for sec, sec_cls in _SECTIONS.items():
            sd = d.get(sec, {})
            if not isinstance(sd, dict):
                raise TypeError(f"Config.from_dict: section {sec!r} must be a dict, got {type(sd).__name__}")
            hints = _hints(sec_cls)
            unknown = [k for k in sd if k not in hints]
            if unknown:
                raise ValueError(f"Config.from_dict: unknown key '{sec}.{unknown[0]}'; valid keys of "
                                 f"{sec!r}: {list(hints)}")
            sections[sec] = sec_cls(**{k: _check_value(v, hints[k], f"{sec}.{k}") for k, v in sd.items()})
        cfg = cls(name=name, **sections)
        cfg.model.kwargs = _checked_model_kwargs(cfg.model, strict_preset=False)
        return cfg

    # --- overrides --------------------------------------------------------------------------------
    def override(self, assignments: Sequence[str]) -> Config:
        """A new Config with ``key=value`` assignments applied in order (see the module docstring for
        the syntax). Unknown key or unparsable value -> ValueError naming the assignment."""
        if isinstance(assignments, str):
            raise TypeError("Config.override: assignments must be a list of 'key=value' strings, got one "
                            "string")
        cfg = copy.deepcopy(self)
        for a in assignments:
            if not isinstance(a, str) or "=" not in a:
                raise ValueError(f"Config.override: expected 'key=value' (e.g. optim.lr=2e-4), got {a!r}")
            key, text = (s.strip() for s in a.split("=", 1))
            if key == "name":
                cfg.name = text
                continue
            sec, _, fld = key.partition(".")
            if sec not in _SECTIONS or not fld or "." in fld:
                raise ValueError(f"Config.override: unknown key {key!r}; keys are 'name' or "
                                 f"'<section>.<field>' with section one of {list(_SECTIONS)}")
            if sec == "model" and fld not in ("preset",):
                cls = _network_class(cfg.model.preset, "Config.override")
                params = _network_params(cls)
                if fld not in params:
                    raise ValueError(f"Config.override: {key!r}: {fld!r} is not a parameter of "
                                     f"{cls.__name__} (the network of preset {cfg.model.preset!r}); valid: "
                                     f"{sorted(params)}")
                cfg.model.kwargs[fld] = _parse_value(text, params[fld], key)
                continue
            hints = _hints(_SECTIONS[sec])
            if fld not in hints:
                raise ValueError(f"Config.override: unknown key {key!r}; valid keys of {sec!r}: "
                                 f"{list(hints)}")
            setattr(getattr(cfg, sec), fld, _parse_value(text, hints[fld], key))
        return cfg

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError (TypeError for a value of the wrong type) on any configuration that cannot
        train, before anything trains; builds the network on the meta device. See the module docstring
        for the label and teacher rules."""
        _validate(self)


# ---------------------------------------------------------------------------------------------
# Types: checking values against annotations, parsing override text
# ---------------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(tp):
    """X for X | None / Optional[X], else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _tuple_elem(tp):
    """The element type of tuple[X, ...] / Sequence[X] / tuple (Any), else None when not a sequence type."""
    origin = typing.get_origin(tp)
    if tp in (tuple, list, Sequence) or origin in (tuple, list, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else Any
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    elem = _tuple_elem(tp)
    if elem is not None:
        return f"a comma list of {_type_name(elem)}" if elem is not Any else "a comma list"
    return getattr(tp, "__name__", str(tp))


# annotation: (its name in messages, which values it accepts, normalization). bool is not an int here.
_SCALARS: dict[type, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    bool: ("a bool", lambda v: isinstance(v, bool), bool),
    int: ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool), int),
    float: ("a float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float),
    str: ("a str", lambda v: isinstance(v, str), str),
}


def _check_value(v, tp, where: str):
    """v checked against annotation tp and normalized (int -> float, list -> tuple); TypeError if wrong."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if v is None else _check_value(v, inner, where)
    if tp is Any or tp is inspect.Parameter.empty:
        return tuple(v) if isinstance(v, list) else v
    elem = _tuple_elem(tp)
    if elem is not None:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{where}: expected {_type_name(tp)}, got {v!r} ({type(v).__name__})")
        return tuple(_check_value(x, elem, f"{where}[{i}]") for i, x in enumerate(v))
    origin = typing.get_origin(tp) or tp
    if origin is dict:
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise TypeError(f"{where}: expected a dict with str keys, got {v!r}")
        return dict(v)
    if tp in _SCALARS:
        what, accepts, normalize = _SCALARS[tp]
        if not accepts(v):
            raise TypeError(f"{where}: expected {what}, got {v!r} ({type(v).__name__})")
        return normalize(v)
    if isinstance(tp, type) and not isinstance(v, tp):
        raise TypeError(f"{where}: expected {tp.__name__}, got {v!r} ({type(v).__name__})")
    return v


_TRUE, _FALSE = ("true", "1"), ("false", "0")
_NONE = ("none", "null")


def _parse_value(text: str, tp, where: str):
    """The override text parsed by annotation tp; ValueError naming `where` when it does not parse."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if text.lower() in _NONE else _parse_value(text, inner, where)
    elem = _tuple_elem(tp)
    if elem is not None:
        body = text.strip()
        if body.startswith(("(", "[")) and body.endswith((")", "]")):
            body = body[1:-1]
        parts = [p.strip() for p in body.split(",")]
        if parts and parts[-1] == "":  # "0.9," is a one-element tuple
            parts = parts[:-1]
        if any(p == "" for p in parts):
            raise ValueError(f"{where}={text!r}: expected {_type_name(tp)} (e.g. 0.9,0.99), got an empty "
                             "element")
        return tuple(_parse_value(p, elem, where) for p in parts)
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{where}={text!r}: expected a bool (true/false/1/0)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}={text!r}: expected an int") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}={text!r}: expected a float") from None
    if tp is str:
        return text
    if (typing.get_origin(tp) or tp) is dict:
        raise ValueError(f"{where}: a dict cannot be set from the command line; set its entries one by one")
    # Unannotated or exotic network parameters: Python literals, else the string.
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# ---------------------------------------------------------------------------------------------
# The network of a config
# ---------------------------------------------------------------------------------------------
def _network_class(preset: str, where: str) -> type:
    from scm import networks
    if preset not in networks.PRESETS:
        raise ValueError(f"{where}: unknown network preset model.preset={preset!r}; presets: "
                         f"{sorted(networks.PRESETS)}")
    return networks.PRESETS[preset][0]


def _network_params(cls: type) -> dict[str, Any]:
    """{name: annotation} of the keyword parameters of cls.__init__ (inspect.signature)."""
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError, AttributeError):  # unresolvable: parse such values as Python literals
        hints = {}
    return {n: hints.get(n, Any) for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _checked_model_kwargs(model: ModelConfig, strict_preset: bool) -> dict:
    """model.kwargs with each value checked against the network's annotations (lists -> tuples)."""
    from scm import networks
    if not isinstance(model.kwargs, dict):
        raise TypeError(f"model.kwargs: expected a dict, got {type(model.kwargs).__name__}")
    if model.preset not in networks.PRESETS and not strict_preset:
        return dict(model.kwargs)
    cls = _network_class(model.preset, "Config")
    params = _network_params(cls)
    out = {}
    for k, v in model.kwargs.items():
        if k not in params:
            raise ValueError(f"model.kwargs: {k!r} is not a parameter of {cls.__name__} (the network of "
                             f"preset {model.preset!r}); valid: {sorted(params)}")
        out[k] = _check_value(v, params[k], f"model.{k}")
    return out


def _network_args(model: ModelConfig) -> dict:
    """The full constructor arguments of the network: class defaults, preset values, overrides."""
    from scm import networks
    cls, preset_kw = networks.PRESETS[model.preset]
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **preset_kw, **model.kwargs}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _choice(v, choices, where):
    if v not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {v!r}")


def _at_least(v, lo, where, strict=False):
    if (v <= lo) if strict else (v < lo):
        raise ValueError(f"{where} must be {'>' if strict else '>='} {lo}, got {v!r}")


def _validate(cfg: Config) -> None:
    import scm_kernels.backend as kb
    from scm import networks, trigflow

    if not isinstance(cfg, Config):
        raise TypeError(f"validate: expected a Config, got {type(cfg).__name__}")
    _check_value(cfg.name, str, "name")
    for sec, sec_cls in _SECTIONS.items():  # types of every field (dataclasses do not check them)
        obj = getattr(cfg, sec)
        if not isinstance(obj, sec_cls):
            raise TypeError(f"{sec}: expected a {sec_cls.__name__}, got {type(obj).__name__}")
        for k, tp in _hints(sec_cls).items():
            _check_value(getattr(obj, k), tp, f"{sec}.{k}")
    m, d, lo, o, e, r = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.ema, cfg.run

    # model: preset, keyword overrides, the network itself (on the meta device)
    cls = _network_class(m.preset, "validate")
    _checked_model_kwargs(m, strict_preset=True)
    args = _network_args(m)
    res, in_ch = args.get("img_resolution"), args.get("in_channels")
    out_ch = args.get("out_channels") or in_ch
    num_classes = args.get("num_classes", 0)

    # data
    _choice(d.source, DATA_SOURCES, "data.source")
    if d.source in ("folder", "npz") and not d.path:
        raise ValueError(f"data.path is required for data.source={d.source!r} (a folder of images / an .npz "
                         "file)")
    _at_least(d.resolution, 1, "data.resolution")
    _at_least(d.channels, 1, "data.channels")
    if d.source == "digits" and d.channels != 1:
        raise ValueError(f"data.channels must be 1 for the digits (grayscale), got {d.channels}")
    if d.resolution != res:
        raise ValueError(f"data.resolution={d.resolution} does not match the network's img_resolution={res} "
                         f"(preset {m.preset!r}); set model.img_resolution={d.resolution} too, or change "
                         "data.resolution")
    if cls.__name__ == "UNet":
        factor, what = 2 ** (len(tuple(args["channel_mult"])) - 1), \
            f"2^(len(channel_mult) - 1) (channel_mult {tuple(args['channel_mult'])})"
    elif "patch_size" in args:
        factor, what = args["patch_size"], "the patch_size"
    else:
        factor, what = 1, ""
    if isinstance(factor, int) and factor > 0 and d.resolution % factor:
        raise ValueError(f"data.resolution={d.resolution} must be divisible by the network's downsampling "
                         f"factor {factor} = {what} of {cls.__name__}")
    if d.channels != in_ch:
        raise ValueError(f"data.channels={d.channels} does not match the network's in_channels={in_ch} "
                         f"(preset {m.preset!r}); set model.in_channels={d.channels}")
    if out_ch != in_ch:
        raise ValueError(f"the network's out_channels={out_ch} must equal in_channels={in_ch}: F_theta has "
                         "the shape of x (A2)")
    if num_classes and not d.use_labels:
        raise ValueError(f"the network is class-conditional (num_classes={num_classes}) but data.use_labels "
                         "is false; set model.num_classes=0 or data.use_labels=true")
    if d.source == "digits" and num_classes and num_classes < DIGITS_CLASSES:
        raise ValueError(f"the digits have {DIGITS_CLASSES} classes but the network has num_classes="
                         f"{num_classes}; set model.num_classes={DIGITS_CLASSES} (or 0: unconditional)")

    # loss
    _choice(lo.kind, LOSS_KINDS, "loss.kind")
    if lo.kind == "scd" and not lo.teacher:
        raise ValueError("loss.kind='scd' needs a teacher: set loss.teacher to a teacher checkpoint file or "
                         "run directory")
    if lo.kind == "teacher" and lo.teacher:
        raise ValueError(f"loss.teacher={lo.teacher!r} is only used by sct/scd (distillation / "
                         "initialization); a teacher run (loss.kind='teacher') must have loss.teacher=none")
    _at_least(lo.sigma_d, 0, "loss.sigma_d", strict=True)
    _choice(lo.proposal, trigflow.TIME_PROPOSALS, "loss.proposal (a key of scm.trigflow.TIME_PROPOSALS)")
    if lo.p_std is not None:
        _at_least(lo.p_std, 0, "loss.p_std", strict=True)
    _at_least(lo.warmup_steps, 0, "loss.warmup_steps")
    if lo.tangent_norm_c is not None:
        _at_least(lo.tangent_norm_c, 0, "loss.tangent_norm_c", strict=True)
    _choice(lo.jvp, JVP_MODES, "loss.jvp")
    _choice(lo.passes, PASSES, "loss.passes")
    if lo.guidance is not None:
        if lo.kind != "scd":
            raise ValueError(f"loss.guidance={lo.guidance} (classifier-free guidance of the teacher) needs "
                             f"loss.kind='scd', got {lo.kind!r}")
        if not args.get("guidance_input", False):
            raise ValueError("loss.guidance needs a student with a guidance input: set "
                             "model.guidance_input=true")
        if not num_classes:
            raise ValueError("loss.guidance (classifier-free guidance) needs a class-conditional network "
                             "(model.num_classes > 0)")

    # optimizer
    _choice(o.name, OPTIMIZERS, "optim.name")
    _at_least(o.lr, 0, "optim.lr", strict=True)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _at_least(o.eps, 0, "optim.eps", strict=True)
    _at_least(o.weight_decay, 0, "optim.weight_decay")
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _at_least(o.ref_steps, 1, "optim.ref_steps")
    _at_least(o.rampup_steps, 0, "optim.rampup_steps")
    if o.grad_clip is not None:
        _at_least(o.grad_clip, 0, "optim.grad_clip", strict=True)

    # EMA
    _at_least(e.halflife_kimg, 0, "ema.halflife_kimg")
    if e.rampup_ratio is not None:
        _at_least(e.rampup_ratio, 0, "ema.rampup_ratio", strict=True)
    for s in e.power_stds:
        if not 0.0 < s < MAX_SIGMA_REL:
            raise ValueError(f"ema.power_stds: every sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (EDM2 "
                             f"power EMA with gamma > 0), got {s}")
    if len(set(e.power_stds)) != len(e.power_stds):
        raise ValueError(f"ema.power_stds must not repeat a value, got {e.power_stds}")
    _at_least(e.snapshot_every, 0, "ema.snapshot_every")
    if e.snapshot_every and not e.power_stds:
        raise ValueError("ema.snapshot_every > 0 needs ema.power_stds (the power EMAs to snapshot)")

    # run
    _at_least(r.batch_size, 1, "run.batch_size")
    _at_least(r.grad_accum, 1, "run.grad_accum")
    if r.batch_size % r.grad_accum:
        raise ValueError(f"run.batch_size={r.batch_size} must be divisible by run.grad_accum={r.grad_accum}")
    _at_least(r.steps, 1, "run.steps")
    _choice(r.precision, PRECISIONS, "run.precision")
    _choice(r.parallel, PARALLEL, "run.parallel")
    _at_least(r.seed, 0, "run.seed")
    if r.device != "auto":
        import torch
        try:
            torch.device(r.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"run.device must be 'auto' or a torch device ('cpu', 'cuda', 'cuda:1'), "
                             f"got {r.device!r}") from None
    if r.backend is not None:
        _choice(r.backend, kb.BACKENDS, "run.backend")
    _at_least(r.ckpt_every, 0, "run.ckpt_every")
    _at_least(r.keep_last, 1, "run.keep_last")
    _at_least(r.log_every, 1, "run.log_every")

    # the network itself, without memory: catches every remaining impossible combination
    try:
        networks.create(m.preset, device="meta", **m.kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model: the network of preset {m.preset!r} with {m.kwargs} cannot be built: "
                         f"{exc}") from None


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def _digits(kind: str) -> Config:
    """The embedded digits (1x8x8, 10 classes) on demo-digits8, CPU-sized: batch 128, RAdam. The sCM
    runs start from the teacher run's EMA (runs/digits-teacher, the default output of digits-teacher)."""
    # time_scale 10, not the networks' default 1000: with 1000 the time derivative in the JVP is large and
    # sCD from the same teacher reached FID-digits 52 (2-step) instead of 5.3 (measured, 800 steps).
    # channels_last: NHWC feature maps, ~16% faster sCT steps on this project's 2-core CPU (batch 128:
    # 200 -> 168 ms, measured alternately in one process)
    model = ModelConfig("demo-digits8", {"num_classes": DIGITS_CLASSES, "time_scale": 10.0, "channels_last": True})
    data = DataConfig(source="digits", resolution=8, channels=1, use_labels=True, hflip=False)
    ema = EMAConfig(halflife_kimg=25.0, rampup_ratio=0.1)
    if kind == "teacher":
        return Config(f"digits-{kind}", model, data, LossConfig(kind="teacher", proposal="cifar10_teacher"),
                      OptimConfig(name="radam", lr=1e-3, betas=(0.9, 0.99), eps=1e-8), ema,
                      RunConfig(batch_size=128, steps=4000, ckpt_every=500))
    lr = 2e-4
    if kind == "sct":  # issue 6: demo sCT 2-step/ODE FID 1.14-1.18 (seeds 0-2) with these, 1.71 before
        lr, ema = 1e-4, EMAConfig(halflife_kimg=500.0, rampup_ratio=0.4)
    loss = LossConfig(kind=kind, teacher="runs/digits-teacher", init_from_teacher=True, proposal="cifar10",
                      warmup_steps=200, tangent_norm_c=0.1)
    return Config(f"digits-{kind}", model, data, loss,
                  OptimConfig(name="radam", lr=lr, betas=(0.9, 0.99), eps=1e-8), ema,
                  RunConfig(batch_size=128, steps=3000, ckpt_every=500))


def _cifar10(kind: str) -> Config:
    """CIFAR-10 32x32, unconditional, on cifar10-ncsnpp-deep, with the paper's settings (A19): RAdam
    lr 1e-4, betas (0.9, 0.99), eps 1e-8, no schedule, batch 512, EMA half-life 0.5 Mimg, dropout 0.2
    (sCT), proposal (-1.0, 1.4), tangent warmup 10k steps. data.path: an image folder of CIFAR-10."""
    model = ModelConfig("cifar10-ncsnpp-deep", {"dropout": 0.2})
    data = DataConfig(source="folder", path="data/cifar10", resolution=32, channels=3, use_labels=False,
                      hflip=True)
    if kind == "teacher":
        loss = LossConfig(kind="teacher", proposal="cifar10_teacher")
    else:
        loss = LossConfig(kind=kind, teacher="runs/cifar10-teacher", init_from_teacher=True,
                          proposal="cifar10", warmup_steps=10000, tangent_norm_c=0.1)
    return Config(f"cifar10-{kind}", model, data, loss,
                  OptimConfig(name="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-8, schedule="constant"),
                  EMAConfig(halflife_kimg=500.0), RunConfig(batch_size=512, steps=400000, ckpt_every=5000))


def _imagenet64_scd() -> Config:
    """sCD on ImageNet 64x64, class-conditional, EDM2-size network (imagenet64-s; -m/-l/-xl via
    model.preset), paper settings (A19): Adam betas (0.9, 0.99), eps 1e-11, EDM2 inverse-sqrt schedule,
    power EMA sigma_rel 0.05 (0.1 tracked too, for post-hoc reconstruction), batch 2048, proposal
    imagenet64 (-1.0, 1.6). The learning rate 1e-4 is this project's choice for its non-magnitude-
    preserving U-Net, not a paper value. data.path: an image folder with one sub-folder per class."""
    return Config(
        "imagenet64-scd",
        ModelConfig("imagenet64-s", {}),
        DataConfig(source="folder", path="data/imagenet64", resolution=64, channels=3, use_labels=True,
                   hflip=False),
        LossConfig(kind="scd", teacher="runs/imagenet64-teacher", init_from_teacher=True,
                   proposal="imagenet64", warmup_steps=10000, tangent_norm_c=0.1),
        OptimConfig(name="adam", lr=1e-4, betas=(0.9, 0.99), eps=1e-11, schedule="inv_sqrt", ref_steps=70000),
        EMAConfig(halflife_kimg=0.0, power_stds=(0.05, 0.1), snapshot_every=4096),
        RunConfig(batch_size=2048, steps=400000, precision="bf16", ckpt_every=5000))


PRESETS: dict[str, Callable[[], Config]] = {
    "digits-teacher": lambda: _digits("teacher"),
    "digits-sct": lambda: _digits("sct"),
    "digits-scd": lambda: _digits("scd"),
    "cifar10-teacher": lambda: _cifar10("teacher"),
    "cifar10-sct": lambda: _cifar10("sct"),
    "imagenet64-scd": _imagenet64_scd,
}


def get_preset(name: str) -> Config:
    """A fresh Config of preset `name` (a new object every call)."""
    if name not in PRESETS:
        raise ValueError(f"get_preset: unknown preset {name!r}; presets: {list(PRESETS)}")
    return PRESETS[name]()


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(cfg: Config) -> str:
    """One paragraph: preset, network (class, parameter count from the meta device, overrides), data,
    loss, optimizer, EMA and run length."""
    from scm import networks
    net = networks.create(cfg.model.preset, device="meta", **cfg.model.kwargs)
    n = networks.count_parameters(net)
    m, d, lo, o, e, r = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.ema, cfg.run
    kw = ", ".join(f"{k}={_fmt(v)}" for k, v in m.kwargs.items())
    cond = f"{net.num_classes} classes" if getattr(net, "num_classes", 0) else "unconditional"
    data = f"{d.source}" + (f" at {d.path}" if d.path else "") + \
        f", {d.channels}x{d.resolution}x{d.resolution}, labels {'on' if d.use_labels else 'off'}" + \
        (", h-flip" if d.hflip else "")
    if lo.kind == "teacher":
        loss = f"teacher (TrigFlow diffusion, A4), proposal {lo.proposal}"
    else:
        loss = (f"{lo.kind} (A12-A18), proposal {lo.proposal}, teacher {lo.teacher or 'none'}"
                f"{' (init from it)' if lo.init_from_teacher and lo.teacher else ''}, tangent warmup "
                f"{lo.warmup_steps} steps, tangent norm c={_fmt(lo.tangent_norm_c)}, jvp {lo.jvp}, "
                f"passes {lo.passes}")
        if lo.guidance is not None:
            loss += f", guidance {_fmt(lo.guidance)}"
    if lo.p_mean is not None or lo.p_std is not None:
        loss += f" (p_mean={_fmt(lo.p_mean)}, p_std={_fmt(lo.p_std)})"
    opt = (f"{o.name} lr {_fmt(o.lr)}, betas {tuple(o.betas)}, eps {_fmt(o.eps)}, {o.schedule} schedule"
           + (f" (ref {o.ref_steps} steps)" if o.schedule == "inv_sqrt" else "")
           + (f", weight decay {_fmt(o.weight_decay)}" if o.weight_decay else "")
           + (f", warm-up {o.rampup_steps} steps" if o.rampup_steps else "")
           + (f", grad clip {_fmt(o.grad_clip)}" if o.grad_clip is not None else ""))
    ema = []
    if e.halflife_kimg > 0:
        ema.append(f"half-life {_fmt(e.halflife_kimg)} kimg" + (f" (ramp-up {_fmt(e.rampup_ratio)})"
                                                                 if e.rampup_ratio is not None else ""))
    if e.power_stds:
        ema.append(f"power EMA sigma_rel {', '.join(_fmt(s) for s in e.power_stds)}")
    return (f"{cfg.name}: network {m.preset} ({type(net).__name__}, {n:,} parameters on the meta device, "
            f"{cond}{'; ' + kw if kw else ''}); data {data}; loss {loss}; optimizer {opt}; "
            f"EMA {' + '.join(ema) if ema else 'off'}; run {r.steps} steps x batch {r.batch_size}"
            f"{f' ({r.grad_accum} accumulation steps)' if r.grad_accum > 1 else ''} = "
            f"{r.steps * r.batch_size / 1000:g} kimg, {r.precision}, seed {r.seed}, device {r.device}.")
