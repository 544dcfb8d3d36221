"""Training losses of continuous-time consistency models: the TrigFlow diffusion (teacher) loss (A4)
and the sCT / sCD loss of Algorithm 1 (A12-A18), on the fused ops of scm_kernels.

One sCM training step (Algorithm 1 of arXiv 2410.11081, labels of shared/docs/algorithm.md):

    t ~ proposal (A9), z ~ N(0, sigma_d^2 I), x_t = cos t x0 + sin t z                     (A1)
    dx_t/dt = cos t z - sin t x0  (sCT)  |  sigma_d F_teacher(x_t / sigma_d, t)  (sCD)      (A12)
    no grad:  (F^-, J) = jvp(F_theta, (x_t / sigma_d, t), (ct st dx_t/dt / sigma_d, ct st))  (A13)
    grad:     F = F_theta(x_t / sigma_d, t)              (same dropout masks: the RNG is forked)
    g = -ct^2 (sigma_d F^- - dx_t/dt) - r (ct st x_t + sigma_d J),  r = min(1, step / H)     (A14, A15)
    L = exp(-logvar)/D ||F - F^- - g / (||g|| + c)||^2 + logvar,  logvar = w_phi(t)         (A16, A17)

(ct = cos t, st = sin t; the last two lines are `scm_kernels.scm_loss`, one fused kernel.)

The model protocol (see also scm.trigflow): ``F = model(x, t, **model_kwargs)`` with x = x_t / sigma_d
and t = c_noise(t) = t of shape (B,). The JVP pass runs either

- "func": ``torch.func.jvp`` over the whole model (every scm_kernels op has a forward-mode rule), or
- "layer": the model's own ``forward_jvp(x, t, x_dot, t_dot, **model_kwargs) -> (F, F_dot)``, where
  F_dot = dF/dx . x_dot + dF/dt . t_dot. A model implements it block by block, each block returning
  its output and tangent (`block_jvp` helps), which is what FSDP-sharded models need: every block's
  parameters are gathered once for the primal and the tangent together.

Both give the same numbers (tests/scm/test_losses.py). "auto" picks "layer" when the model has
``forward_jvp``.

Merged passes (``SCMLoss(passes=...)``): with theta^- = stopgrad(theta) and the same dropout masks,
F^- is F's value, so the JVP pass can BE the gradient pass: one pass with grad enabled gives F
(differentiable) and J (its tangent, a constant of the loss), and F^- = F.detach(). That saves one
forward of the network per step (measured: demo-32 U-Net, batch 64, CPU: 15-17% of the step) and
gives F - F^- = 0 exactly. Inside it (`tangents_without_grad`), `block_jvp` and the networks'
attention JVP return tangents detached, so the tangent's own autograd graph lives only within one
block. "auto" merges for models that declare ``forward_jvp_differentiable = True`` (scm.networks'
U-Net and DiT) on the per-layer path when the gradient pass goes through the same module (no
other ``jvp_model``) and nothing in it is FSDP-sharded: DDP- and FSDP-wrapped models keep two
passes, their gradient hooks are set up by the wrapper's forward.

Dropout masks: the JVP pass and the gradient pass must see the same masks, or F^- != F and the loss
gains a spurious ||F - F^-||^2 term. `SCMLoss` saves the random-number state of the CPU and of the
data's CUDA device before the JVP pass and restores it before every later pass of the student (the
gradient pass, the finite-difference passes of A18), so every pass draws the same random numbers
in the same order. This holds for any model whose random draws do not depend on whether it runs
under a JVP (true for torch's dropout; tested); the RNG ends up advanced by one pass, as in a plain
forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

import scm_kernels
from scm.trigflow import TimeProposal, cfg_combine, per_sample, time_proposal
from scm_kernels.time_embedding import reference as _time_embedding_ref

__all__ = [
    "AdaptiveWeighting", "DiffusionLossOutput", "PASSES", "SCMLoss", "SCMLossOutput", "SupportsForwardJVP",
    "TrigFlowDiffusionLoss", "block_jvp", "detach_tangents", "fork_rng_state", "model_jvp",
    "tangent_arithmetic", "tangents_without_grad",
]

PASSES = ("auto", "merged", "separate")


# ---------------------------------------------------------------------------------------------
# The per-layer JVP protocol
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class SupportsForwardJVP(Protocol):
    """A TrigFlow model with its own forward-mode pass (the per-layer JVP path of SCMLoss).

    ``forward_jvp(x, t, x_dot, t_dot, **model_kwargs)`` returns ``(F, F_dot)``: the output of
    ``model(x, t, **model_kwargs)`` and its directional derivative dF/dx . x_dot + dF/dt . t_dot,
    x (B, ...), t (B,), tangents of their shapes. It is called under torch.no_grad(); it must draw
    random numbers (dropout) exactly as ``forward`` does, in the same order.

    A model whose forward_jvp, run with grad enabled, returns an F differentiable exactly as
    forward's (the same operations on the primal) may set the class attribute
    ``forward_jvp_differentiable = True``: SCMLoss(passes="auto") then runs it with grad enabled,
    inside `tangents_without_grad`, as the gradient pass too (merged passes, see the module doc)."""

    def forward_jvp(self, x: torch.Tensor, t: torch.Tensor, x_dot: torch.Tensor, t_dot: torch.Tensor,
                    **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]: ...


_TANGENTS_WITHOUT_GRAD = contextvars.ContextVar("scm_tangents_without_grad", default=False)


@contextlib.contextmanager
def tangents_without_grad():
    """Within this context the per-layer JVP helpers (`block_jvp`, scm.networks' attention JVP)
    return tangents that carry no gradient (detached), also with grad enabled: the merged pass of
    SCMLoss, whose tangent J is a constant of the loss. The primal keeps its autograd graph; the
    tangent's graph is freed at the end of each block instead of being held until the backward."""
    token = _TANGENTS_WITHOUT_GRAD.set(True)
    try:
        yield
    finally:
        _TANGENTS_WITHOUT_GRAD.reset(token)


def detach_tangents() -> bool:
    """True inside `tangents_without_grad`."""
    return _TANGENTS_WITHOUT_GRAD.get()


def tangent_arithmetic():
    """The context for a block's tangent-only arithmetic outside block_jvp: torch.no_grad() inside
    `tangents_without_grad` (no tangent graph is kept), nothing otherwise."""
    return torch.no_grad() if _TANGENTS_WITHOUT_GRAD.get() else contextlib.nullcontext()


def _detached(tree):
    return torch.utils._pytree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, tree)


def block_jvp(fn: Callable, primals: tuple, tangents: tuple) -> tuple:
    """(fn(*primals), its tangent) for one block of a per-layer JVP: torch.func.jvp where a tangent
    given as None means zero (e.g. a class embedding that does not depend on x or t). Inside
    `tangents_without_grad` the tangents (given and returned) are detached."""
    detach = _TANGENTS_WITHOUT_GRAD.get()
    tangents = tuple(torch.zeros_like(p) if d is None else (d.detach() if detach else d)
                     for p, d in zip(primals, tangents))
    out, out_dot = torch.func.jvp(fn, tuple(primals), tangents)
    return (out, _detached(out_dot)) if detach else (out, out_dot)


def model_jvp(model, x: torch.Tensor, t: torch.Tensor, x_dot: torch.Tensor, t_dot: torch.Tensor | None,
              model_kwargs: dict | None = None, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F_dot) of a TrigFlow model along (x_dot, t_dot) (t_dot None: the time is held fixed).

    mode "func": torch.func.jvp over the whole model; "layer": model.forward_jvp; "auto": "layer" when
    the model implements it. Runs in whatever grad mode the caller set (SCMLoss: no_grad)."""
    kw = model_kwargs or {}
    if mode == "auto":
        mode = "layer" if isinstance(model, SupportsForwardJVP) else "func"
    if mode == "layer":
        if not isinstance(model, SupportsForwardJVP):
            raise TypeError(f"jvp='layer' needs a model with forward_jvp(x, t, x_dot, t_dot, **kw); "
                            f"{type(model).__name__} has none (use jvp='func')")
        return model.forward_jvp(x, t, x_dot, torch.zeros_like(t) if t_dot is None else t_dot, **kw)
    if mode != "func":
        raise ValueError(f"jvp mode must be 'auto', 'func' or 'layer', got {mode!r}")
    if t_dot is None:
        return torch.func.jvp(lambda xx: model(xx, t, **kw), (x,), (x_dot,))
    return torch.func.jvp(lambda xx, tt: model(xx, tt, **kw), (x, t), (x_dot, t_dot))


class fork_rng_state:
    """Saves the random-number state of the CPU and of `device` (when CUDA) at construction;
    ``restore()`` puts it back, so that the next pass draws the same numbers (dropout masks)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda":
            self.cuda_index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.cuda_index)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_index)


# ---------------------------------------------------------------------------------------------
# Adaptive weighting w_phi (A17)
# ---------------------------------------------------------------------------------------------
class AdaptiveWeighting(nn.Module):
    """logvar(t) = -w_phi(t) of (A17): a small MLP on the time embedding (A10) of c_noise(t) = t.

    emb = scm_kernels.time_embedding(t, dim, time_scale=...)  (always float32, also under autocast)
    logvar = Linear(hidden, 1)(SiLU(Linear(dim, hidden)(emb)))    (hidden = 0: one Linear(dim, 1))

    The whole module runs outside autocast in its parameters' dtype (float32 by default; float64
    modules embed in float64 with the plain-PyTorch reference, for oracle tests). The last layer
    starts at zero: logvar = 0, weight 1. Returns (B,)."""

    def __init__(self, dim: int = 128, hidden: int = 128, *, kind: str = "positional", max_period: float = 10000.0,
                 time_scale: float = 1000.0, backend: str | None = None):
        super().__init__()
        self.dim, self.kind, self.max_period, self.time_scale, self.backend = dim, kind, max_period, time_scale, backend
        if kind == "fourier":
            self.register_buffer("freqs", torch.randn(dim // 2))
        else:
            self.freqs = None
        layers: list[nn.Module] = []
        if hidden > 0:
            layers += [nn.Linear(dim, hidden), nn.SiLU()]
        last = nn.Linear(hidden if hidden > 0 else dim, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        kw = {"kind": self.kind, "max_period": self.max_period, "time_scale": self.time_scale, "freqs": self.freqs}
        if dtype == torch.float64:
            return _time_embedding_ref.time_embedding(t.to(torch.float64), self.dim, compute_dtype=torch.float64, **kw)
        return scm_kernels.time_embedding(t.reshape(-1), self.dim, backend=self.backend, **kw).to(dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(t.device.type, enabled=False):
            return self.mlp(self.embed(t.detach())).reshape(-1)


def _make_weighting(weighting) -> nn.Module | None:
    if weighting is True:
        return AdaptiveWeighting()
    if weighting is None or weighting is False:
        return None
    if not callable(weighting):
        raise TypeError(f"weighting must be True, False/None or a module t -> logvar, got {type(weighting).__name__}")
    return weighting


def _proposal(p) -> TimeProposal:
    if isinstance(p, str):
        return time_proposal(p)
    if isinstance(p, TimeProposal):
        return p
    if isinstance(p, (tuple, list)) and len(p) == 2:
        return TimeProposal(float(p[0]), float(p[1]))
    raise TypeError(f"proposal must be a preset name, a TimeProposal or (p_mean, p_std), got {p!r}")


def _time_dtype(x0: torch.Tensor) -> torch.dtype:
    """Times and their tangents stay float32 (float64 for float64 data), whatever the model's dtype or
    autocast: the time embedding is computed from them in fp32 (A10)."""
    return torch.float64 if x0.dtype == torch.float64 else torch.float32


def _finite_rows(*xs: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where every element of sample b of every tensor is finite."""
    ok = None
    for x in xs:
        r = torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
        ok = r if ok is None else ok & r
    return ok


# ---------------------------------------------------------------------------------------------
# Teacher: diffusion loss in TrigFlow (A4)
# ---------------------------------------------------------------------------------------------
@dataclass
class DiffusionLossOutput:
    loss: torch.Tensor  # scalar: mean over the batch
    per_sample: torch.Tensor  # (B,) float32
    logvar: torch.Tensor | None  # (B,) or None
    t: torch.Tensor  # (B,) times used


class TrigFlowDiffusionLoss(nn.Module):
    """The TrigFlow diffusion loss (A4) with adaptive weighting (A17's w_phi):

        v_t = cos t z - sin t x0,   mse_b = ||sigma_d F_theta(x_t / sigma_d, t) - v_t||^2 / (sigma_d^2 D)
        L_b = exp(-logvar_b) mse_b + logvar_b         (weighting None: L_b = mse_b)

    The 1/sigma_d^2 makes the target unit-scale (a constant factor); t from the teacher proposal (A9)."""

    def __init__(self, *, sigma_d: float = 0.5, proposal="cifar10_teacher", weighting=True):
        super().__init__()
        self.sigma_d = float(sigma_d)
        self.proposal = _proposal(proposal)
        self.weighting = _make_weighting(weighting)

    def forward(self, model, x0: torch.Tensor, *, model_kwargs: dict | None = None, t: torch.Tensor | None = None,
                z: torch.Tensor | None = None, generator: torch.Generator | None = None) -> DiffusionLossOutput:
        sd, B = self.sigma_d, x0.shape[0]
        if t is None:
            t = self.proposal.sample(B, sd, generator=generator, device=x0.device, dtype=_time_dtype(x0))
        if z is None:
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sd
        tt = per_sample(t, x0)
        x_t = torch.cos(tt) * x0 + torch.sin(tt) * z  # (A1)
        v_t = torch.cos(tt) * z - torch.sin(tt) * x0  # (A4)
        F = model(x_t / sd, t, **(model_kwargs or {}))
        err = (sd * F.float() if F.dtype not in (torch.float32, torch.float64) else sd * F) - v_t
        mse = (err * err).reshape(B, -1).sum(dim=1) / (sd * sd * err[0].numel())
        logvar = self.weighting(t) if self.weighting is not None else None
        per = mse if logvar is None else torch.exp(-logvar) * mse + logvar
        return DiffusionLossOutput(per.mean(), per, logvar, t)


# ---------------------------------------------------------------------------------------------
# sCT / sCD: Algorithm 1
# ---------------------------------------------------------------------------------------------
@dataclass
class SCMLossOutput:
    loss: torch.Tensor  # scalar: mean of per_sample over the kept samples (0 if none is kept)
    per_sample: torch.Tensor  # (B,) float32 loss of each sample (A17); NaN where dropped
    logvar: torch.Tensor | None  # (B,) w_phi's logvar, or None without adaptive weighting
    t: torch.Tensor  # (B,) the times used
    num_dropped: torch.Tensor  # 0-d int64: samples dropped for non-finite values (no host sync)
    r: float  # the tangent warmup factor of this step (A15)
    F_minus: torch.Tensor  # the primal of the JVP pass (A13), detached
    jvp_out: torch.Tensor  # J = cos t sin t dF^-/dt (A13), detached
    guidance: torch.Tensor | None = None  # (B,) guidance scales given to the student (sCD with CFG)


class SCMLoss(nn.Module):
    """The sCT / sCD loss of Algorithm 1 (A12-A18); holds the adaptive weighting network w_phi.

    Args:
        sigma_d: data standard deviation.
        proposal: time proposal (A9): a preset name of scm.trigflow.TIME_PROPOSALS, a TimeProposal or
            (p_mean, p_std). Default the CIFAR-10 values (-1.0, 1.4).
        teacher: None for sCT (A12: dx_t/dt = cos t z - sin t x0); a TrigFlow F for sCD
            (dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t, **model_kwargs), evaluated under no_grad; put
            it in eval mode). Held by reference, not registered as a submodule: it is not in
            parameters() / state_dict(), and .to() does not move it.
        guidance: sCD with classifier-free guidance: a number w, or a range (lo, hi) from which one
            w per sample is drawn uniformly. The teacher is then F_u + w (F_c - F_u), F_c with the
            call's model_kwargs and F_u with them updated by `uncond_kwargs`; the student receives w
            as the extra keyword `guidance_kwarg` ((B,) tensor of the time dtype).
        weighting: True (an AdaptiveWeighting, A17), None/False (weight 1, no logvar term), or any
            module t (B,) -> logvar (B,).
        warmup_steps: H of the tangent warmup r = min(1, step / H) (A15); 0 turns warmup off.
        tangent_norm_c: c of the tangent normalization g / (||g|| + c) (A16); None turns it off (the
            loss is then computed in plain PyTorch: the fused kernel always normalizes).
        jvp: "auto", "func" (torch.func.jvp over the model) or "layer" (model.forward_jvp).
        passes: "separate" (a no-grad JVP pass, then the gradient pass), "merged" (one JVP pass with
            grad enabled is the gradient pass: F^- = F.detach(), one network forward fewer; needs
            the gradient pass to go through `model` itself, no other jvp_model) or "auto" (merged
            for a model with ``forward_jvp_differentiable = True`` on the "layer" path, with no other
            jvp_model, no FSDP-sharded module and not torch.compile'd; separate otherwise). The same F^-, loss and
            gradients either way, up to the rounding of the tangent's ops (tested). With
            jvp="func", "merged" holds the tangent's autograd graph of the whole model until the
            loss is formed (more memory); the per-layer path frees it block by block.
        semi_continuous: (A18) exact JVP in x, central finite difference in t with step fd_step
            (clipped at 0 and pi/2); two more forward passes of the student under no_grad.
        nonfinite: "drop" (samples with a non-finite F^-, J, dx_t/dt or F are left out of the mean and
            counted in num_dropped; their tangent side is zeroed so that no NaN reaches the loss
            kernel's gradient), "raise" (RuntimeError; syncs), or "ignore".
            Note: a sample whose own forward F is non-finite cannot be cleaned from the parameter
            gradients by masking (0 * inf in the model's backward); it is reported, and the training
            loop should skip a step whose gradients are not finite.
        backend: scm_kernels backend of the fused ops (None: automatic).
    Call: ``loss_fn(model, x0, step=..., model_kwargs=..., t=None, z=None, generator=None, jvp_model=None)``;
    t (B,) and z (noise of std sigma_d, x0's shape) override the random draws. ``step`` is required when
    warmup is on. ``jvp_model``: the module for the no-grad passes (JVP, and A18's extra forwards) when
    `model` is a wrapper that cannot be JVP'ed, e.g. DistributedDataParallel (pass ddp.module); the
    gradient pass uses `model`.
    """

    def __init__(self, *, sigma_d: float = 0.5, proposal="cifar10", teacher=None, guidance=None,
                 guidance_kwarg: str = "guidance", uncond_kwargs: dict | None = None, weighting=True,
                 warmup_steps: int = 10000, tangent_norm_c: float | None = 0.1, jvp: str = "auto",
                 passes: str = "auto", semi_continuous: bool = False, fd_step: float = 1e-4,
                 nonfinite: str = "drop", backend: str | None = None):
        super().__init__()
        if jvp not in ("auto", "func", "layer"):
            raise ValueError(f"SCMLoss: jvp must be 'auto', 'func' or 'layer', got {jvp!r}")
        if passes not in PASSES:
            raise ValueError(f"SCMLoss: passes must be one of {PASSES}, got {passes!r}")
        if nonfinite not in ("drop", "raise", "ignore"):
            raise ValueError(f"SCMLoss: nonfinite must be 'drop', 'raise' or 'ignore', got {nonfinite!r}")
        if warmup_steps < 0:
            raise ValueError(f"SCMLoss: warmup_steps must be >= 0, got {warmup_steps}")
        if tangent_norm_c is not None and not tangent_norm_c > 0:
            raise ValueError(f"SCMLoss: tangent_norm_c must be > 0 or None, got {tangent_norm_c}")
        if guidance is not None and teacher is None:
            raise ValueError("SCMLoss: guidance (classifier-free guidance of the teacher) needs a teacher (sCD)")
        if not fd_step > 0:
            raise ValueError(f"SCMLoss: fd_step must be > 0, got {fd_step}")
        self.sigma_d = float(sigma_d)
        self.proposal = _proposal(proposal)
        self.teacher = teacher
        self.guidance = guidance
        self.guidance_kwarg = guidance_kwarg
        self.uncond_kwargs = dict(uncond_kwargs or {})
        self.weighting = _make_weighting(weighting)
        self.warmup_steps = int(warmup_steps)
        self.tangent_norm_c = tangent_norm_c
        self.jvp = jvp
        self.passes = passes
        self.semi_continuous = bool(semi_continuous)
        self.fd_step = float(fd_step)
        self.nonfinite = nonfinite
        self.backend = backend

    # The teacher is not a parameter of the loss: keep it out of state_dict / parameters().
    def __setattr__(self, name, value):
        if name == "teacher" and isinstance(value, nn.Module):
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def warmup(self, step: int | None) -> float:
        """r = min(1, step / H) (A15)."""
        if self.warmup_steps == 0:
            return 1.0
        if step is None:
            raise ValueError(f"SCMLoss: tangent warmup is on (warmup_steps={self.warmup_steps}): pass step=<training "
                             "step>, or build the loss with warmup_steps=0")
        return min(1.0, max(0, step) / self.warmup_steps)

    def merges(self, model, jvp_model=None) -> bool:
        """Whether a call with these models runs merged passes (see `passes`)."""
        if self.passes == "separate" or not torch.is_grad_enabled():
            return False
        if self.passes == "merged":
            if jvp_model is not None and jvp_model is not model:
                raise ValueError("SCMLoss: passes='merged' takes the gradient pass from the JVP pass of "
                                 "`model`; with a separate jvp_model (e.g. the module of a DDP wrapper) use "
                                 "passes='separate' or 'auto'")
            return True
        layer = self.jvp == "layer" or (self.jvp == "auto" and isinstance(model, SupportsForwardJVP))
        # a torch.compile'd model (OptimizedModule, `_orig_mod`) keeps two passes: its forward_jvp is the
        # eager module's, and merging would take the gradient pass out of the compiled forward
        return (layer and (jvp_model is None or jvp_model is model) and not hasattr(model, "_orig_mod")
                and getattr(model, "forward_jvp_differentiable", False) is True and not _fsdp_sharded(model))

    def _draw_guidance(self, B, device, dtype, generator):
        g = self.guidance
        if isinstance(g, (tuple, list)):
            lo, hi = float(g[0]), float(g[1])
            u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
            return (lo + (hi - lo) * u).to(dtype)
        return torch.full((B,), float(g), device=device, dtype=dtype)

    @torch.no_grad()
    def tangent(self, x0, z, x_t, t, model_kwargs, w):
        """dx_t/dt of (A12): sCT from the path; sCD from the teacher (with CFG when w is given)."""
        tt = per_sample(t, x0)
        if self.teacher is None:
            return torch.cos(tt) * z - torch.sin(tt) * x0
        sd, kw = self.sigma_d, model_kwargs
        F_c = self.teacher(x_t / sd, t, **kw)
        if w is not None:
            F_u = self.teacher(x_t / sd, t, **{**kw, **self.uncond_kwargs})
            F_c = cfg_combine(F_c.to(x0.dtype), F_u.to(x0.dtype), w)
        return sd * F_c.to(x0.dtype)

    def forward(self, model, x0: torch.Tensor, *, step: int | None = None, model_kwargs: dict | None = None,
                t: torch.Tensor | None = None, z: torch.Tensor | None = None,
                generator: torch.Generator | None = None, jvp_model=None) -> SCMLossOutput:
        sd, B, dev = self.sigma_d, x0.shape[0], x0.device
        jm = model if jvp_model is None else jvp_model
        tdt = _time_dtype(x0)
        r = self.warmup(step)
        kw = dict(model_kwargs or {})
        # Draws: t (A9), z ~ N(0, sigma_d^2 I), and the guidance scales (sCD with CFG).
        if t is None:
            t = self.proposal.sample(B, sd, generator=generator, device=dev, dtype=tdt)
        else:
            t = t.to(device=dev, dtype=tdt).reshape(B)
        if z is None:
            z = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype) * sd
        w = self._draw_guidance(B, dev, tdt, generator) if self.guidance is not None else None
        student_kw = {**kw, self.guidance_kwarg: w} if w is not None else kw

        with torch.autocast(dev.type, enabled=False):
            tt = per_sample(t, x0)
            x_t = torch.cos(tt) * x0 + torch.sin(tt) * z  # (A1)
        dxt_dt = self.tangent(x0, z, x_t, t, kw, w)  # (A12)

        # (A13): one forward-mode pass of F_theta^- with the rearranged tangents.
        cs = torch.cos(t) * torch.sin(t)  # (B,) in the time dtype
        x_in = x_t / sd
        x_dot = per_sample(cs, x0).to(x0.dtype) * dxt_dt / sd
        rng = fork_rng_state(dev)
        t_dot = None if self.semi_continuous else cs  # (A18): exact in x, finite difference in t
        merged = self.merges(model, jvp_model)
        if merged:  # one pass: the JVP pass with grad enabled is the gradient pass; F^- = F's value
            with tangents_without_grad():
                F, J = model_jvp(model, x_in, t, x_dot, t_dot, student_kw, self.jvp)
            F_minus, J = F.detach(), J.detach()
        else:
            with torch.no_grad():
                F_minus, J = model_jvp(jm, x_in, t, x_dot, t_dot, student_kw, self.jvp)
        if self.semi_continuous:
            after = fork_rng_state(dev) if merged else None  # the RNG as after one pass
            h = self.fd_step
            t_hi = (t + h).clamp(max=math.pi / 2)
            t_lo = (t - h).clamp(min=0.0)
            with torch.no_grad():
                rng.restore()
                F_hi = jm(x_in, t_hi, **student_kw)
                rng.restore()
                F_lo = jm(x_in, t_lo, **student_kw)
            J = J + per_sample(cs / (t_hi - t_lo), J).to(J.dtype) * (F_hi - F_lo)
            if after is not None:
                after.restore()
        if not merged:
            rng.restore()
            F = model(x_in, t, **student_kw)  # the gradient pass: same dropout masks as the JVP pass

        # Non-finite samples (fp16 JVP overflow, a bad teacher output): out of the mean, counted.
        if self.nonfinite == "ignore":
            ok = None
        else:
            ok = _finite_rows(F_minus, J, dxt_dt, F.detach())
            if self.nonfinite == "raise":
                if not bool(ok.all()):
                    raise RuntimeError(f"SCMLoss: {int((~ok).sum())} of {B} samples have non-finite F, F^-, "
                                       "J or dx_t/dt (nonfinite='raise')")
                ok = None
            else:
                okb = per_sample(ok, F_minus)
                F_minus = torch.where(okb, F_minus, 0)
                J = torch.where(okb, J, 0)
                dxt_dt = torch.where(okb, dxt_dt, 0)

        logvar = self.weighting(t) if self.weighting is not None else None
        if self.tangent_norm_c is not None:  # (A14)-(A17), fused
            per = scm_kernels.scm_loss(F, J, x_t, dxt_dt, t, logvar, F_minus=F_minus, sigma_d=sd, r=r,
                                       c=self.tangent_norm_c, backend=self.backend)
        else:  # (A14), (A17) without (A16)
            per = _loss_unnormalized(F, J, x_t, dxt_dt, t, logvar, F_minus, sd, r)

        if ok is None:
            loss = per.mean()
            num_dropped = torch.zeros((), dtype=torch.int64, device=dev)
            per_out = per.detach()
        else:
            kept = ok.sum()
            loss = torch.where(ok, per, 0).sum() / kept.clamp(min=1)
            num_dropped = B - kept
            per_out = torch.where(ok, per.detach(), float("nan"))
        return SCMLossOutput(loss, per_out, logvar, t, num_dropped, r, F_minus.detach(), J.detach(), w)


def _fsdp_sharded(model) -> bool:
    """True when `model` or a module in it is FSDP2-sharded: FSDP2's gradient hooks are set up by
    the modules' own forward (__call__), which the merged pass does not run."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) if isinstance(model, nn.Module) else False


def _loss_unnormalized(F, J, x_t, dxt_dt, t, logvar, F_minus, sigma_d, r):
    """(A14) and (A17) without the tangent normalization (A16), in plain PyTorch, accumulated in
    float32 (float64 for float64 inputs)."""
    acc = torch.float64 if F.dtype == torch.float64 else torch.float32
    Fm, J, x, dx = (v.detach().to(acc) for v in (F_minus, J, x_t, dxt_dt))
    tt = per_sample(t.detach().to(acc), Fm)
    g = -torch.cos(tt) ** 2 * (sigma_d * Fm - dx) - r * (torch.cos(tt) * torch.sin(tt) * x + sigma_d * J)
    B = F.shape[0]
    sq = ((F.to(acc) - Fm - g) ** 2).reshape(B, -1).sum(dim=1) / F[0].numel()
    if logvar is None:
        return sq.float() if acc == torch.float32 else sq
    lv = logvar.reshape(B).to(acc)
    out = torch.exp(-lv) * sq + lv
    return out.float() if acc == torch.float32 else out
