"""The training loop of scm: TrigFlow diffusion teachers (A4) and sCT / sCD students (Algorithm 1,
A12-A18) with one loop, on one CPU or many GPUs (DDP through torchrun).

    train(cfg, out_dir, resume=False)     # cfg: scm.config.Config
    model, cfg = load_model(out_dir)       # the EMA network of the newest checkpoint

What one optimizer step does (global batch B = run.batch_size over W ranks and A accumulation steps):
  1. every rank draws the GLOBAL batch's times t (A9) and noise z from one generator seeded by run.seed
     and keeps its slice, so that the numbers do not depend on W (W ranks == 1 rank, same global batch);
  2. per micro-batch: the loss (TrigFlowDiffusionLoss or SCMLoss; for sCM the no-grad JVP pass runs on
     the unwrapped module, the gradient pass through DDP), backward of loss * (micro / local batch);
  3. gradients of the adaptive weighting w_phi are all-reduced by hand (it lives outside the DDP
     module), fp16 gradients are unscaled, the global gradient norm is measured, clipped when asked;
     a non-finite norm skips the step (the same decision on every rank: the gradients are reduced)
     and is counted in `skipped`;
  4. learning rate: lr * min(1, step / rampup_steps) [/ sqrt(max(step / ref_steps, 1)) with the EDM2
     inverse-sqrt schedule], then the optimizer step and the EMA updates (half-life EMA, EDM2 power
     EMAs).

Checkpoints (scm.checkpoint: atomic, weights_only loadable) every run.ckpt_every steps, at the end and
on SIGINT/SIGTERM, carry everything a resume needs: model, EMAs, optimizer, grad scaler, w_phi, the
random states of every rank, the data position, the step. On CPU a resumed run reproduces the losses
of the uninterrupted run bit for bit (tests/scm/test_training.py).

Output folder: config.json, ckpt/ckpt-<step>.pt, metrics.csv, weights.safetensors (final EMA weights),
power_ema/ (snapshots for post-hoc EMA), tensorboard/ (when tensorboard is installed).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scm import networks
from scm.checkpoint import CheckpointError, CheckpointManager, export_safetensors, load_checkpoint, save_atomic
from scm.config import Config
from scm.data import BatchStream, build_dataset
from scm.ema import EMA, PowerEMA
from scm.losses import SCMLoss, TrigFlowDiffusionLoss
from scm.trigflow import TIME_PROPOSALS, TimeProposal

FORMAT = "scm-ckpt-1"
# Fields of the config that may change between a run and its resume.
RESUMABLE_CHANGES = {("run", "steps"), ("run", "ckpt_every"), ("run", "keep_last"), ("run", "log_every")}


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimizer steps done (all of them, also before a resume)
    nimg: int
    losses: list[float] = field(default_factory=list)  # mean loss of each step run in this call
    skipped: int = 0  # steps skipped for non-finite gradients (whole run)
    interrupted: bool = False  # stopped by SIGINT / SIGTERM (a checkpoint was written)
    checkpoint: Path | None = None


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR; nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _device(cfg: Config, d: _Dist) -> torch.device:
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(want)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={cfg.run.device!r}, but torch has no CUDA device here")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


# ---------------------------------------------------------------------------------------------
# Building blocks from the config
# ---------------------------------------------------------------------------------------------
def build_network(cfg: Config, device=None) -> nn.Module:
    model = networks.create(cfg.model.preset, device=device, **dict(cfg.model.kwargs))
    if cfg.run.backend is not None:
        model.set_backend(cfg.run.backend)
    return model


def _proposal(cfg: Config) -> TimeProposal:
    base = TIME_PROPOSALS[cfg.loss.proposal]
    return TimeProposal(base.p_mean if cfg.loss.p_mean is None else float(cfg.loss.p_mean),
                        base.p_std if cfg.loss.p_std is None else float(cfg.loss.p_std))


def build_loss(cfg: Config, teacher: nn.Module | None):
    lc = cfg.loss
    if lc.kind == "teacher":
        return TrigFlowDiffusionLoss(sigma_d=lc.sigma_d, proposal=_proposal(cfg), weighting=lc.weighting)
    return SCMLoss(sigma_d=lc.sigma_d, proposal=_proposal(cfg), teacher=teacher if lc.kind == "scd" else None,
                   guidance=lc.guidance if lc.kind == "scd" else None, weighting=lc.weighting,
                   warmup_steps=lc.warmup_steps, tangent_norm_c=lc.tangent_norm_c, jvp=lc.jvp,
                   passes=lc.passes, semi_continuous=lc.semi_continuous, backend=cfg.run.backend)


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    oc = cfg.optim
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[oc.name]
    return cls(params, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)


def learning_rate(cfg: Config, step: int) -> float:
    """lr of optimizer step `step` (counted from 1): linear ramp-up over rampup_steps, then constant or
    EDM2's inverse square root decay lr / sqrt(max(step / ref_steps, 1)) (A19)."""
    oc = cfg.optim
    lr = oc.lr
    if oc.rampup_steps > 0:
        lr *= min(1.0, step / oc.rampup_steps)
    if oc.schedule == "inv_sqrt":
        lr /= math.sqrt(max(step / oc.ref_steps, 1.0))
    return lr


def _autocast(cfg: Config, device: torch.device):
    if cfg.run.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _load_state(path) -> tuple[dict, Path]:
    """A checkpoint file, or the newest loadable one of a run directory (DIR/ckpt/*.pt or DIR/*.pt)."""
    p = Path(path)
    if p.is_dir():
        d = p / "ckpt" if (p / "ckpt").is_dir() else p
        got = CheckpointManager(d).load_latest()
        if got is None:
            raise CheckpointError(f"no loadable checkpoint in {d}")
        return got
    return load_checkpoint(p), p


def load_model(path, *, which: str = "ema", device="cpu") -> tuple[nn.Module, Config]:
    """The network stored in a checkpoint (file or run directory: its newest loadable checkpoint), in
    eval mode without gradients, and the run's Config.

    which: "ema" (half-life EMA; falls back to the raw weights with a warning when the run kept
    none), "model" (raw weights), or "power:<sigma_rel>" (an EDM2 power EMA tracked by the run)."""
    state, p = _load_state(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an scm training checkpoint (format {state.get('format')!r}, "
                              f"expected {FORMAT!r})")
    cfg = Config.from_dict(state["config"])
    model = build_network(cfg, device="cpu")
    model.load_state_dict(state["model"])
    if which == "ema":
        if state.get("ema") is None:
            warnings.warn(f"scm.training.load_model: {p} has no EMA (ema.halflife_kimg=0); using the raw weights",
                          stacklevel=2)
        else:
            ema = EMA(model, cfg.ema.halflife_kimg, cfg.ema.rampup_ratio)
            ema.load_state_dict(state["ema"])
            model = ema.module
    elif which.startswith("power:"):
        if state.get("power_ema") is None:
            raise ValueError(f"scm.training.load_model: {p} tracked no power EMA (ema.power_stds is empty)")
        std = float(which.split(":", 1)[1])
        pema = PowerEMA(model, stds=tuple(cfg.ema.power_stds))
        pema.load_state_dict(state["power_ema"])
        match = [s for s in pema.modules if abs(float(s) - std) < 1e-9]
        if not match:
            raise ValueError(f"scm.training.load_model: which={which!r}: the run tracked sigma_rel "
                             f"{sorted(float(s) for s in pema.modules)}")
        model = pema.modules[match[0]]
    elif which != "model":
        raise ValueError(f"scm.training.load_model: which must be 'ema', 'model' or 'power:<sigma_rel>', got {which!r}")
    model = model.to(device).eval().requires_grad_(False)
    return model, cfg


def _config_changes(old: dict, new: dict) -> list[str]:
    out = []
    for sec, vals in new.items():
        if not isinstance(vals, dict):
            if old.get(sec) != vals and sec != "name":
                out.append(sec)
            continue
        for k, v in vals.items():
            ov = (old.get(sec) or {}).get(k)
            if (sec, k) not in RESUMABLE_CHANGES and json.dumps(ov) != json.dumps(v):
                out.append(f"{sec}.{k}: {ov!r} -> {v!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Signals: SIGINT / SIGTERM finish the step, save, and return
# ---------------------------------------------------------------------------------------------
class _StopFlag:
    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------
class _Log:
    COLUMNS = ["step", "nimg", "loss", "lr", "grad_norm", "skipped", "dropped", "images_per_s", "seconds"]

    def __init__(self, out: Path, enabled: bool, resume: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = out / "metrics.csv"
        new = not (resume and self.path.exists())
        self.f = open(self.path, "w" if new else "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(self.COLUMNS)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV only
            self.tb = None

    def truncate_after(self, step: int):
        """On resume: drop rows logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        self.f.close()
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step] if rows else [self.COLUMNS]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        self.f = open(self.path, "a", newline="")
        self.w = csv.writer(self.f)

    def row(self, **kv):
        if not self.enabled:
            return
        self.w.writerow([kv[c] for c in self.COLUMNS])
        self.f.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "images_per_s"):
                self.tb.add_scalar(f"train/{k}", kv[k], kv["step"])

    def close(self):
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device):
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _gather(obj, d: _Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _teacher(cfg: Config, device) -> nn.Module | None:
    if cfg.loss.kind == "teacher" or cfg.loss.teacher is None:
        return None
    teacher, tcfg = load_model(cfg.loss.teacher, which="ema", device=device)
    if tcfg.model.preset != cfg.model.preset:
        warnings.warn(f"scm.training: the teacher's network preset {tcfg.model.preset!r} differs from the "
                      f"student's {cfg.model.preset!r}", stacklevel=3)
    return teacher


def train(cfg: Config, out_dir, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train per `cfg` into `out_dir` (see the module docstring). resume=True continues from the newest
    loadable checkpoint in out_dir/ckpt (a fresh start if there is none). Returns a TrainResult.
    Launch with torchrun for DDP; every rank calls train() with the same arguments."""
    cfg.validate()
    out = Path(out_dir)
    dev_kind = "cuda" if (cfg.run.device == "auto" and torch.cuda.is_available()) or \
        str(cfg.run.device).startswith("cuda") else "cpu"
    d = _init_distributed(dev_kind)
    done = False
    try:
        result = _train(cfg, out, resume, progress, d)
        done = True
        return result
    finally:
        if d.owns_group:
            # Every rank returns from _train together (stops are all-reduced), but rank 0 still
            # writes the weights after the last collective, so a rank could tear its group down
            # while a peer is still busy with it. The barrier rules that race out (one 2-rank gloo
            # FSDP test run in a full suite aborted at exit with "terminate called without an
            # active exception"; 9 reruns of that test's three cases did not reproduce it). Not
            # after an error, which the other ranks may never reach.
            if done:
                dist.barrier()
            dist.destroy_process_group()


def _train(cfg: Config, out: Path, resume: bool, progress: bool, d: _Dist) -> TrainResult:
    rc = cfg.run
    device = _device(cfg, d)
    if rc.batch_size % (d.world * rc.grad_accum):
        raise ValueError(f"run.batch_size={rc.batch_size} must be divisible by world size {d.world} x "
                         f"run.grad_accum {rc.grad_accum}")
    local_b = rc.batch_size // d.world
    micro = local_b // rc.grad_accum
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if d.world > 1:
        dist.barrier()
    ckpts = CheckpointManager(out / "ckpt", keep_last=rc.keep_last)

    # Everything random at initialization is drawn from the run seed, identically on every rank.
    torch.manual_seed(rc.seed)
    teacher = _teacher(cfg, device)
    model = build_network(cfg).to(device)
    if teacher is not None and cfg.loss.init_from_teacher:
        missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or missing:
            warnings.warn(f"scm.training: initialized from the teacher with missing keys {missing} and "
                          f"unexpected keys {unexpected}", stacklevel=2)
    loss_fn = build_loss(cfg, teacher).to(device)
    ema = EMA(model, cfg.ema.halflife_kimg, cfg.ema.rampup_ratio) if cfg.ema.halflife_kimg > 0 else None
    pema = PowerEMA(model, stds=tuple(cfg.ema.power_stds)) if cfg.ema.power_stds else None
    fsdp = d.world > 1 and rc.parallel == "fsdp"
    if fsdp:  # FSDP2: the model and its EMA copies sharded block by block (before the optimizer)
        from scm import distributed as sdist
        averages = ([ema.module] if ema is not None else []) + (list(pema.modules.values()) if pema else [])
        for m in [model] + averages:
            sdist.shard_model(m)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = _optimizer(cfg, params)
    scaler = torch.amp.GradScaler(device.type) if rc.precision == "fp16" else None

    dataset = build_dataset(cfg.data, split="train")
    stream = BatchStream(dataset, rc.batch_size, seed=rc.seed, rank=d.rank, world_size=d.world,
                         hflip=cfg.data.hflip, device=device)
    noise_gen = torch.Generator().manual_seed(rc.seed + 1)  # global-batch t and z (CPU, then moved)
    torch.manual_seed(rc.seed + 1000 + d.rank)  # dropout etc.: per rank

    step, nimg, skipped = 0, 0, 0
    state = None
    if resume:
        got = ckpts.load_latest(map_location="cpu")
        if got is not None:
            state, path = got
            changes = _config_changes(state["config"], cfg.to_dict())
            if changes:
                raise ValueError(f"scm.training: cannot resume {path} with a different configuration: "
                                 + "; ".join(changes) + f" (only {sorted('.'.join(k) for k in RESUMABLE_CHANGES)} "
                                 "may change)")
            if state["world_size"] != d.world:
                raise ValueError(f"scm.training: {path} was written by {state['world_size']} ranks; resume it "
                                 f"with the same number (got {d.world}): the random streams are per rank")
            loss_fn.load_state_dict(state["weighting"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if fsdp:  # full tensors in the checkpoint -> this rank's shards
                sdist.load_full_state_dict(model, state["model"])
                sdist.load_full_optimizer_state_dict(opt, state["optimizer"])
                if ema is not None:
                    sdist.load_full_state_dict(ema.module, state["ema"]["module"])
                if pema is not None:
                    for s, m in zip(pema.stds, state["power_ema"]["modules"]):
                        sdist.load_full_state_dict(pema.modules[s], m)
                    pema.step = int(state["power_ema"]["step"])
            else:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                if ema is not None:
                    ema.load_state_dict(state["ema"])
                if pema is not None:
                    pema.load_state_dict(state["power_ema"])
            stream.load_state_dict(state["data"])
            noise_gen.set_state(state["rng"]["noise"])
            _set_rng_state(state["rng"]["ranks"][d.rank], device)
            step, nimg, skipped = int(state["step"]), int(state["nimg"]), int(state["skipped"])
            if d.main:
                print(f"[scm] resumed from {path} at step {step}")

    ddp = None
    if d.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.world > 1:
        for p in loss_fn.parameters():  # w_phi: identical on every rank (same seed); make sure
            dist.broadcast(p.data, 0)
    grad_model = ddp if ddp is not None else model

    log = _Log(out, d.main, resume and state is not None)
    if state is not None:
        log.truncate_after(step)
    bar = None
    if progress and d.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=rc.steps, initial=step, desc=f"{cfg.name} ({cfg.loss.kind})", unit="step",
                   dynamic_ncols=True)
    result = TrainResult(out, step, nimg, skipped=skipped)
    sd = cfg.loss.sigma_d
    use_labels = cfg.data.use_labels and getattr(model, "num_classes", 0) > 0
    t_dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    last_ckpt = None
    t_last, img_last = time.perf_counter(), 0
    model.train()

    def save():
        rngs = _gather(_rng_state(device), d)
        big = {"model": model.state_dict(), "optimizer": opt.state_dict(),
               "ema": ema.state_dict() if ema is not None else None,
               "power_ema": pema.state_dict() if pema is not None else None}
        if fsdp:  # gather the shards (a collective: every rank, before the main-rank check)
            big = sdist.gather_full(big)
        if not d.main:
            return None
        st = {"format": FORMAT, "step": step, "nimg": nimg, "skipped": skipped, "world_size": d.world,
              "config": cfg.to_dict(), "weighting": loss_fn.state_dict(), **big,
              "scaler": scaler.state_dict() if scaler is not None else None,
              "data": stream.state_dict(), "rng": {"noise": noise_gen.get_state(), "ranks": rngs}}
        return ckpts.save(st, step)

    with _StopFlag() as stop:
        while step < rc.steps:
            x, y = stream.next()
            # (1) the global batch's times and noise, sliced to this rank
            t_all = loss_fn.proposal.sample(rc.batch_size, sd, generator=noise_gen, dtype=t_dtype)
            z_all = torch.randn((rc.batch_size, *x.shape[1:]), generator=noise_gen, dtype=x.dtype) * sd
            sl = slice(d.rank * local_b, (d.rank + 1) * local_b)
            t_loc, z_loc = t_all[sl].to(device), z_all[sl].to(device)
            step += 1
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            dropped = torch.zeros((), device=device, dtype=torch.int64)
            for a in range(rc.grad_accum):
                ms = slice(a * micro, (a + 1) * micro)
                kw = {"class_labels": y[ms]} if use_labels else {}
                sync = contextlib.nullcontext() if (ddp is None or a == rc.grad_accum - 1) else ddp.no_sync()
                if fsdp:  # reduce-scatter only after the last micro-batch
                    model.set_requires_gradient_sync(a == rc.grad_accum - 1)
                with sync:
                    with _autocast(cfg, device):
                        if cfg.loss.kind == "teacher":
                            o = loss_fn(grad_model, x[ms], model_kwargs=kw, t=t_loc[ms], z=z_loc[ms])
                        else:
                            o = loss_fn(grad_model, x[ms], step=step, model_kwargs=kw, t=t_loc[ms], z=z_loc[ms],
                                        jvp_model=model)
                            dropped += o.num_dropped
                    part = o.loss * (1.0 / rc.grad_accum)
                    (scaler.scale(part) if scaler is not None else part).backward()
                loss_sum += o.loss.detach().double() / rc.grad_accum
            # (3) reduce w_phi's gradients and the loss; unscale; norm; guard; clip
            if d.world > 1:
                for p in loss_fn.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= d.world
                dist.all_reduce(loss_sum)
                loss_sum /= d.world
                dist.all_reduce(dropped)
            if scaler is not None:
                scaler.unscale_(opt)
            grads = [p.grad for p in params if p.grad is not None]
            clip = cfg.optim.grad_clip
            if fsdp:  # torch's clip_grad_norm_ refuses sharded + plain (w_phi) parameters together
                gnorm = sdist.clip_grad_norm_(params, clip if clip is not None else float("inf"))
            else:
                gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"),
                                                       error_if_nonfinite=False) if grads else torch.zeros(())
            lr = learning_rate(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            finite = bool(torch.isfinite(gnorm))
            if scaler is not None:
                scaler.step(opt)  # skips by itself on inf/NaN and lowers the scale
                scaler.update()
            elif finite:
                opt.step()
            if not finite:
                skipped += 1
            else:
                nimg += rc.batch_size
                if ema is not None:
                    ema.update(model, nimg, rc.batch_size)
                if pema is not None:
                    pema.update(model, step)
                    if cfg.ema.snapshot_every and step % cfg.ema.snapshot_every == 0:
                        snap = pema.snapshot() if (fsdp or d.main) else None
                        snap = sdist.gather_full(snap) if fsdp else snap  # collective: every rank
                        if d.main:
                            save_atomic(snap, out / "power_ema" / f"snap-{step:09d}.pt")
            lval = float(loss_sum)
            result.losses.append(lval)
            if step % rc.log_every == 0 or step == rc.steps:
                now = time.perf_counter()
                ips = (nimg - img_last) / max(now - t_last, 1e-9)
                log.row(step=step, nimg=nimg, loss=f"{lval:.6g}", lr=f"{lr:.6g}", grad_norm=f"{float(gnorm):.6g}",
                        skipped=skipped, dropped=int(dropped), images_per_s=f"{ips:.1f}", seconds=f"{now:.3f}")
                t_last, img_last = now, nimg
                if bar is not None:
                    bar.set_postfix(loss=f"{lval:.4f}", img_s=f"{ips:.0f}", skipped=skipped)
            if bar is not None:
                bar.update(1)
            # stop requested on any rank -> every rank saves and returns
            flag = torch.tensor([0 if stop.signum is None else 1], device=device)
            if d.world > 1:
                dist.all_reduce(flag)
            if bool(flag.item()):
                result.interrupted = True
                last_ckpt = save()
                if d.main:
                    print(f"\n[scm] stopped by signal at step {step}; checkpoint {last_ckpt}")
                break
            if rc.ckpt_every and step % rc.ckpt_every == 0 and step < rc.steps:
                last_ckpt = save()
        else:
            last_ckpt = save()
            sd_out = (ema.module if ema is not None else model).state_dict()
            if fsdp:
                sd_out = sdist.gather_full(sd_out)
            if d.main:
                export_safetensors({k: v.detach().cpu().contiguous() for k, v in sd_out.items()},
                                   out / "weights.safetensors",
                                   metadata={"config": json.dumps(cfg.to_dict()), "step": str(step),
                                             "weights": "ema" if ema is not None else "model"})
    if bar is not None:
        bar.close()
    log.close()
    result.step, result.nimg, result.skipped, result.checkpoint = step, nimg, skipped, last_ckpt
    return result
