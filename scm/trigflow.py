"""TrigFlow: the parameterization of sCM (sec. 3 and app. B of Lu & Song, arXiv 2410.11081).

Formulas (labels of shared/docs/algorithm.md):

    (A1)  x_t = cos t * x0 + sin t * z,            z ~ N(0, sigma_d^2 I),  t in [0, pi/2]
    (A2)  F_theta(x_t / sigma_d, c_noise(t)),      c_noise(t) = t
    (A3)  dx_t/dt = sigma_d * F_theta(x_t / sigma_d, t)
    (A4)  v_t = cos t * z - sin t * x0             (the teacher's target for sigma_d * F)
    (A5)  f_theta(x_t, t) = cos t * x_t - sin t * sigma_d * F_theta(x_t / sigma_d, t)
    (A6)  sigma = sigma_d * tan t,  x_t = cos t * x_sigma,  x_sigma = x0 + sigma * eps
    (A7)  x_s = cos(t - s) * x_t - sin(t - s) * sigma_d * F   (DDIM: exact move with F frozen)
    (A8)  flow matching, x_fm = (1 - tau) x0 + tau n:  tau = sigma_d sin t / (cos t + sigma_d sin t)
    (A9)  log(sigma_d tan t) ~ N(P_mean, P_std^2)             (the time proposal)

The model protocol used across `scm` (losses, samplers, wrappers): a TrigFlow network is a callable

    F = model(x, t, **model_kwargs)      x = x_t / sigma_d (B, ...),  t = c_noise(t) = t, (B,) float

returning F of x's shape. Models that also implement ``forward_jvp`` (see `scm.losses`) get the
per-layer JVP path of the sCM loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "SIGMA_MAX", "TIME_PROPOSALS", "T_MID", "ClassifierFreeGuidance", "EDMDenoiserAsTrigFlow",
    "FlowMatchingAsTrigFlow", "TimeProposal", "call_model", "cfg_combine", "ddim_step", "denoise",
    "diffuse", "edm_sigma", "per_sample", "t_max", "time_from_sigma", "time_proposal", "velocity",
    "x_sigma_to_x_t", "x_t_to_x_sigma",
]

SIGMA_MAX = 80.0  # EDM's sigma_max; the sampling start T = arctan(SIGMA_MAX / sigma_d) (A20)
T_MID = 1.1  # the intermediate time of the 2-step sampler (A22)


def t_max(sigma_d: float = 0.5, sigma_max: float = SIGMA_MAX) -> float:
    """T = arctan(sigma_max / sigma_d) (A20), about 1.5645 for sigma_d = 0.5 and sigma_max = 80."""
    return math.atan(sigma_max / sigma_d)


def per_sample(t, like: torch.Tensor) -> torch.Tensor:
    """A time given as a number, a one-element tensor or a (B,) tensor, as a tensor that broadcasts
    against `like` (B, ...): shape (B, 1, ..., 1), or () for a single value. Dtype: t's own when a
    tensor, else like's."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            return t.reshape(())
        if t.dim() < 1 or t.shape[0] != like.shape[0] or t.numel() != like.shape[0]:
            raise ValueError(f"a per-sample time must have {like.shape[0]} elements (shape (B,)), "
                             f"got shape {tuple(t.shape)}")
        return t.reshape((like.shape[0],) + (1,) * (like.dim() - 1))
    return torch.tensor(float(t), dtype=like.dtype, device=like.device)


def diffuse(x0: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
    """x_t = cos t * x0 + sin t * z (A1). z is the noise with std sigma_d (not unit noise)."""
    tt = per_sample(t, x0)
    return torch.cos(tt) * x0 + torch.sin(tt) * z


def velocity(x0: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
    """dx_t/dt = cos t * z - sin t * x0 (A4 target v_t; the sCT tangent of A12)."""
    tt = per_sample(t, x0)
    return torch.cos(tt) * z - torch.sin(tt) * x0


def denoise(x_t: torch.Tensor, F: torch.Tensor, t, sigma_d: float = 0.5) -> torch.Tensor:
    """The consistency function f = cos t * x_t - sin t * sigma_d * F (A5), plain PyTorch (the
    samplers use the fused scm_kernels.trigflow_step)."""
    tt = per_sample(t, x_t)
    return torch.cos(tt) * x_t - torch.sin(tt) * sigma_d * F


def ddim_step(x_t: torch.Tensor, F: torch.Tensor, t, s, sigma_d: float = 0.5) -> torch.Tensor:
    """x_s = cos(t - s) * x_t - sin(t - s) * sigma_d * F (A7): the exact ODE move from t to s when the
    predictions x0^ = cos t x_t - sin t sigma_d F and z^ = sin t x_t + cos t sigma_d F stay fixed.
    s = 0 gives (A5)."""
    h = per_sample(t, x_t) - per_sample(s, x_t)
    return torch.cos(h) * x_t - torch.sin(h) * sigma_d * F


# ---------------------------------------------------------------------------------------------
# EDM <-> TrigFlow (A6)
# ---------------------------------------------------------------------------------------------
def edm_sigma(t, sigma_d: float = 0.5):
    """sigma = sigma_d * tan t (A6), for a number or a tensor."""
    return sigma_d * (torch.tan(t) if isinstance(t, torch.Tensor) else math.tan(t))


def time_from_sigma(sigma, sigma_d: float = 0.5):
    """t = arctan(sigma / sigma_d) (A6), for a number or a tensor (sigma = inf gives pi/2)."""
    if isinstance(sigma, torch.Tensor):
        return torch.atan(sigma / sigma_d)
    return math.atan(sigma / sigma_d)


def x_sigma_to_x_t(x_sigma: torch.Tensor, t) -> torch.Tensor:
    """x_t = cos t * x_sigma (A6)."""
    return torch.cos(per_sample(t, x_sigma)) * x_sigma


def x_t_to_x_sigma(x_t: torch.Tensor, t) -> torch.Tensor:
    """x_sigma = x_t / cos t (A6); t < pi/2."""
    return x_t / torch.cos(per_sample(t, x_t))


# ---------------------------------------------------------------------------------------------
# Time proposal (A9)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimeProposal:
    """The time proposal of (A9): tau ~ N(p_mean, p_std^2), t = arctan(exp(tau) / sigma_d), i.e.
    log(sigma_d tan t) = log(sigma) is normal (EDM's log-normal noise levels, in TrigFlow time)."""

    p_mean: float = -1.0
    p_std: float = 1.4

    def sample(self, batch: int, sigma_d: float = 0.5, *, generator: torch.Generator | None = None,
               device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch,) times t in (0, pi/2) (A9), computed in float64 then cast to dtype."""
        tau = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
        tau = self.p_mean + self.p_std * tau
        return torch.atan(torch.exp(tau) / sigma_d).to(dtype)

    def log_prob(self, t: torch.Tensor, sigma_d: float = 0.5) -> torch.Tensor:
        """log density of t under the proposal: tau = log(sigma_d tan t), d tau / dt = 1/(sin t cos t)."""
        t = t.to(torch.float64)
        tau = torch.log(sigma_d * torch.tan(t))
        normal = -0.5 * ((tau - self.p_mean) / self.p_std) ** 2 - math.log(self.p_std * math.sqrt(2 * math.pi))
        return normal - torch.log(torch.sin(t) * torch.cos(t))


# Paper values (A9): consistency models (sCT/sCD) and their diffusion teachers.
TIME_PROPOSALS: dict[str, TimeProposal] = {
    "cifar10": TimeProposal(-1.0, 1.4),
    "cifar10_teacher": TimeProposal(-1.0, 1.4),
    "imagenet64": TimeProposal(-1.0, 1.6),
    "imagenet64_teacher": TimeProposal(-0.8, 1.6),
    "imagenet512": TimeProposal(-0.8, 1.6),
    "imagenet512_teacher": TimeProposal(-0.4, 1.0),
}


def time_proposal(name: str) -> TimeProposal:
    """The (A9) preset for a dataset name: cifar10, imagenet64, imagenet512, each also with
    the suffix _teacher (the diffusion teacher's proposal; CIFAR-10 uses one for both)."""
    try:
        return TIME_PROPOSALS[name]
    except KeyError:
        raise ValueError(f"scm.trigflow.time_proposal: unknown preset {name!r}; "
                         f"choose one of {sorted(TIME_PROPOSALS)}") from None


# ---------------------------------------------------------------------------------------------
# Calling a TrigFlow model
# ---------------------------------------------------------------------------------------------
def call_model(model, x_t: torch.Tensor, t, sigma_d: float, model_kwargs: dict | None = None) -> torch.Tensor:
    """F = model(x_t / sigma_d, t_vec, **model_kwargs) (A2), t_vec = c_noise(t) = t as a (B,) float32
    tensor (float64 when x_t is float64)."""
    B = x_t.shape[0]
    tdt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    if isinstance(t, torch.Tensor):
        t_vec = t.to(device=x_t.device, dtype=tdt).reshape(-1).expand(B) if t.numel() == 1 else \
            t.to(device=x_t.device, dtype=tdt).reshape(B)
    else:
        t_vec = torch.full((B,), float(t), dtype=tdt, device=x_t.device)
    return model(x_t / sigma_d, t_vec, **(model_kwargs or {}))


def cfg_combine(F_cond: torch.Tensor, F_uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance on F: F_uncond + w * (F_cond - F_uncond), w a number or (B,)."""
    w = per_sample(scale, F_cond) if isinstance(scale, torch.Tensor) else scale
    return F_uncond + w * (F_cond - F_uncond)


class ClassifierFreeGuidance(nn.Module):
    """A TrigFlow F with classifier-free guidance: F = F_u + w (F_c - F_u), where F_c =
    model(x, t, **kw) and F_u = model(x, t, **kw, **uncond_kwargs) (e.g. {"class_labels": None}).

    The scale w is `scale` (a number) unless the call passes the keyword `guidance` (a number or a
    (B,) tensor), which is consumed here and not given to the model. Used by the sCD teacher (A12)."""

    def __init__(self, model, scale: float = 1.0, uncond_kwargs: dict | None = None):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.uncond_kwargs = dict(uncond_kwargs or {})

    def forward(self, x: torch.Tensor, t: torch.Tensor, guidance=None, **kw) -> torch.Tensor:
        w = self.scale if guidance is None else guidance
        F_c = self.model(x, t, **kw)
        if not isinstance(w, torch.Tensor) and w == 1.0:
            return F_c
        F_u = self.model(x, t, **{**kw, **self.uncond_kwargs})
        return cfg_combine(F_c, F_u, w)


# ---------------------------------------------------------------------------------------------
# Teachers of other parameterizations as a TrigFlow F
# ---------------------------------------------------------------------------------------------
class EDMDenoiserAsTrigFlow(nn.Module):
    """A TrigFlow F from an EDM denoiser D(x_sigma, sigma, **kw) -> x0^ (A6).

    x_t = sigma_d x, sigma = sigma_d tan t, x_sigma = x_t / cos t, and F follows from (A5) with the
    consistency function replaced by the denoiser (f = D at the optimum):
        F = (cos t * x_t - D(x_sigma, sigma)) / (sigma_d sin t).
    For EDM's preconditioning with the same sigma_d (c_skip = cos^2 t, c_out = sigma_d sin t,
    c_in = cos t / sigma_d) this is exactly minus the raw network output F_edm(c_in x_sigma, c_noise),
    so the division by sin t only cancels a factor that the denoiser contains; times below t_min are
    clamped to t_min (F is continuous at 0 for a smooth denoiser).
    `sigma_shape`: "vector" passes sigma as (B,), "broadcast" as (B, 1, ..., 1) (EDM's code)."""

    def __init__(self, denoiser, sigma_d: float = 0.5, *, t_min: float = 1e-4, sigma_shape: str = "vector"):
        super().__init__()
        if sigma_shape not in ("vector", "broadcast"):
            raise ValueError(f"EDMDenoiserAsTrigFlow: sigma_shape must be 'vector' or 'broadcast', got {sigma_shape!r}")
        self.denoiser = denoiser
        self.sigma_d = float(sigma_d)
        self.t_min = float(t_min)
        self.sigma_shape = sigma_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        sd = self.sigma_d
        t = t.clamp(min=self.t_min)
        tt = per_sample(t, x).to(x.dtype)
        x_t = sd * x
        cos_t, sin_t = torch.cos(tt), torch.sin(tt)
        x_sigma = x_t / cos_t  # (A6)
        sigma = sd * torch.tan(t.to(x.dtype))
        if self.sigma_shape == "broadcast":
            sigma = per_sample(sigma, x)
        D = self.denoiser(x_sigma, sigma, **kw)
        return (cos_t * x_t - D) / (sd * sin_t)


class FlowMatchingAsTrigFlow(nn.Module):
    """A TrigFlow F from a flow-matching velocity model v(x_fm, tau, **kw) ~ n - x0 (A8).

    The flow-matching path x_fm = (1 - tau) x0 + tau n, n ~ N(0, I), is the TrigFlow path with
    z = sigma_d n after a change of time and scale:
        tau  = sigma_d sin t / (cos t + sigma_d sin t)
        x_fm = x_t (1 - tau) / cos t = x_t / (cos t + sigma_d sin t)   (the second form is finite at pi/2)
        x0^ = x_fm - tau v^,  n^ = x_fm + (1 - tau) v^,  F = (sigma_d cos t n^ - sin t x0^) / sigma_d.
    `time_scale` multiplies tau before the call (e.g. 1000 for models trained on integer steps)."""

    def __init__(self, velocity_model, sigma_d: float = 0.5, *, time_scale: float = 1.0):
        super().__init__()
        self.velocity_model = velocity_model
        self.sigma_d = float(sigma_d)
        self.time_scale = float(time_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        sd = self.sigma_d
        tt = per_sample(t, x).to(x.dtype)
        cos_t, sin_t = torch.cos(tt), torch.sin(tt)
        denom = cos_t + sd * sin_t
        tau_b = sd * sin_t / denom  # (A8)
        x_fm = sd * x / denom
        tau = (sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t))).to(x.dtype)
        v = self.velocity_model(x_fm, self.time_scale * tau, **kw)
        x0 = x_fm - tau_b * v
        n = x_fm + (1 - tau_b) * v
        return (sd * cos_t * n - sin_t * x0) / sd
