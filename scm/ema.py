"""Exponential moving averages of the weights: the plain EMA with a half-life in images (EDM, Karras et
al. 2022), and EDM2's power-function EMA with post-hoc reconstruction of any sigma_rel (Karras et al.
2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3 and app. C).

Plain EMA (`EMA`), per optimizer step of `batch` images:

    (E1)  beta = 0.5 ** (batch / halflife_img),   halflife_img = 1000 * halflife_kimg
    (E2)  EDM ramp-up (optional): halflife_img = min(halflife_img, nimg * rampup_ratio)
    (E3)  ema <- beta * ema + (1 - beta) * theta

so a step in theta is half absorbed after exactly halflife_img images, whatever the batch size.

Power-function EMA (`PowerEMA`). Averaging the trajectory theta(tau), 0 < tau <= t, with weights
proportional to tau^gamma gives the normalized profile

    (E4)  p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)    on (0, t]

whose width relative to t is (u = tau / t has density (gamma + 1) u^gamma on (0, 1]):

    (E5)  sigma_rel^2 = Var[u] = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))

Inverting (E5) means solving the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, s = sigma_rel^-2;
sigma_rel(gamma) rises on (-1, gamma*] and falls on [gamma*, inf), where d log sigma_rel^2 / d gamma =
1/(gamma+1) - 2/(gamma+2) - 1/(gamma+3) = 0 gives gamma^2 + 3 gamma + 1 = 0, gamma* = (sqrt 5 - 3) / 2
(sigma_rel <= 0.3003). Like EDM2 we take the largest root, on the falling branch: sigma_rel = 0.1 ->
gamma = 6.94, 0.05 -> 16.97. The running update, with t the step counted from 1,

    (E6)  beta_t = (1 - 1/t)^(gamma + 1),   ema_t = beta_t * ema_{t-1} + (1 - beta_t) * theta_t

unrolls (by induction, the product of the betas telescopes) to

    (E7)  ema_t = sum_{i<=t} w_i theta_i,   w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1)
                = integral of (E4) over (i-1, i]

i.e. exactly the integral of (E4) against the piecewise-constant trajectory theta(tau) = theta_i on
(i-1, i]. (Weights proportional to i^gamma themselves are only the O(1/t) approximation of (E7).)

Post-hoc reconstruction (`posthoc_reconstruct`, EDM2 sec. 3.2). Snapshots ema_j of profiles p_j =
p_{gamma_j, t_j} are saved during training; any target profile p* = p_{gamma*, t*} is approximated by
sum_j x_j p_j in L2(0, inf), and the same combination of the snapshots is returned. By (E7) the snapshots
and the directly tracked target are the same linear functional of theta(tau), so the reconstruction error
is at most ||sum_j x_j p_j - p*|| * ||theta|| (Cauchy-Schwarz). Normal equations A x = b with the closed-form
inner products (m = min(t_a, t_b), needs gamma_a + gamma_b > -1):

    (E8)  <p_a, p_b> = int_0^m (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
                     = (g_a+1)(g_b+1) / ((g_a+g_b+1) m) * (m/t_a)^(g_a+1) * (m/t_b)^(g_b+1)
          (g = gamma)

    (E9)  A_jk = <p_j, p_k>,  b_j = <p_j, p*>,  x = argmin ||A x - b|| (float64 least squares, minimum-norm
          when snapshots repeat),  residual^2 = x^T A x - 2 b^T x + <p*, p*>

(E8) is written with ratios m/t <= 1 so that no power overflows float64 for any step count.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "EMA", "PowerEMA", "gamma_to_sigma_rel", "posthoc_coefficients", "posthoc_reconstruct",
    "power_profile_dot", "sigma_rel_to_gamma",
]

GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # argmax of sigma_rel(gamma) (E5), about -0.382


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _averaged_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(_unwrap(model)).eval()
    m.requires_grad_(False)
    return m


def _pairs(dst: nn.Module, src: nn.Module, what: str):
    a, b = list(getattr(dst, what)()), list(getattr(src, what)())
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"the model's {what} do not match the averaged copy's "
                         f"({len(b)} vs {len(a)} tensors): pass the same architecture that was averaged")
    return a, b


@torch.no_grad()
def _lerp_into(dst: nn.Module, src: nn.Module, weight: float) -> None:
    """dst <- dst + weight * (src - dst) for the floating-point parameters; buffers (e.g. running
    statistics, counters) are copied, not averaged."""
    src = _unwrap(src)
    dp, sp = _pairs(dst, src, "parameters")
    for d, s in zip(dp, sp):
        if d.is_floating_point() or d.is_complex():
            d.lerp_(s.detach().to(d.dtype), weight)
        else:
            d.copy_(s)
    for d, s in zip(*_pairs(dst, src, "buffers")):
        d.copy_(s)


def _check_nonneg_number(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                              and value >= 0):
        expected = "a finite number >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


class EMA:
    """Plain EMA of the weights with a half-life counted in images (E1-E3).

    halflife_kimg: half-life in thousands of images (0 makes the average follow the model).
    rampup_ratio: EDM's ramp-up (E2), e.g. 0.05; None disables it.
    """

    def __init__(self, model: nn.Module, halflife_kimg: float, rampup_ratio: float | None = None):
        _check_nonneg_number("halflife_kimg", halflife_kimg)
        _check_nonneg_number("rampup_ratio", rampup_ratio, allow_none=True)
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.module = _averaged_copy(model)

    def beta(self, nimg: int, batch_images: int) -> float:
        """(E1) with (E2): the weight kept from the current average for a step of batch_images images when
        nimg images have been seen (EDM passes the count before this batch)."""
        halflife_img = self.halflife_kimg * 1000.0
        if self.rampup_ratio is not None:
            halflife_img = min(halflife_img, nimg * self.rampup_ratio)
        return 0.5 ** (batch_images / max(halflife_img, 1e-8))

    def update(self, model: nn.Module, nimg: int, batch_images: int) -> None:
        """Average in the model's current weights (E3)."""
        _check_nonneg_number("nimg", nimg)
        if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 1:
            raise ValueError(f"batch_images must be an int >= 1, got {batch_images!r}")
        _lerp_into(self.module, model, 1.0 - self.beta(nimg, batch_images))

    def state_dict(self) -> dict:
        return {"halflife_kimg": self.halflife_kimg, "rampup_ratio": self.rampup_ratio,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the averaged weights. The half-life and ramp-up stay those given to the constructor
        (the run's configuration decides them)."""
        if not isinstance(state, Mapping) or "module" not in state:
            keys = list(state) if isinstance(state, Mapping) else None
            raise ValueError("EMA.load_state_dict expects the dict of EMA.state_dict() (with a 'module' "
                             f"key), got {type(state).__name__} with keys {keys}")
        self.module.load_state_dict(state["module"])


def gamma_to_sigma_rel(gamma: float) -> float:
    """(E5): sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), gamma > -1."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > -1 or math.isinf(gamma):
        raise ValueError(f"gamma must be a finite number > -1, got {gamma!r}")
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Inverse of (E5) on the branch gamma >= gamma* = (sqrt 5 - 3)/2 (the largest root of the cubic, as in
    EDM2), by bisection in float64 to the last bit. sigma_rel must lie in (0, sigma_rel(gamma*) ~ 0.3003]."""
    smax = gamma_to_sigma_rel(GAMMA_PEAK)
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel <= smax:
        raise ValueError(f"sigma_rel must be a number in (0, {smax:.6f}], got {sigma_rel!r}")
    s = float(sigma_rel)
    # sigma_rel(gamma) < 1 / (gamma + 2), so at gamma = 1/s it is already below s: the root lies in [lo, hi].
    lo, hi = GAMMA_PEAK, 1.0 / s
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if gamma_to_sigma_rel(mid) > s:
            lo = mid
        else:
            hi = mid
    return lo if abs(gamma_to_sigma_rel(lo) - s) <= abs(gamma_to_sigma_rel(hi) - s) else hi


class PowerEMA:
    """EDM2 power-function EMA (E4-E7): one averaged copy per sigma_rel in `stds`.

    update(model, step) with the optimizer step counted from 1 (the first update copies the weights);
    snapshot() returns CPU copies to save for `posthoc_reconstruct`.
    """

    def __init__(self, model: nn.Module, stds: Iterable[float] = (0.05, 0.1)):
        stds = tuple(float(s) for s in stds)
        if not stds or len(set(stds)) != len(stds):
            raise ValueError(f"stds must be a non-empty tuple of distinct sigma_rel values, got {stds!r}")
        self.stds = stds
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in stds)
        self.modules: dict[float, nn.Module] = {s: _averaged_copy(model) for s in stds}
        self.step = 0

    @staticmethod
    def beta(gamma: float, step: int) -> float:
        """(E6): beta_t = (1 - 1/t)^(gamma + 1)."""
        return (1.0 - 1.0 / step) ** (gamma + 1.0)

    def update(self, model: nn.Module, step: int) -> None:
        """Average in the weights after optimizer step `step` (>= 1) with (E6)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (counted from 1), got {step!r}")
        for s, g in zip(self.stds, self.gammas):
            _lerp_into(self.modules[s], model, 1.0 - self.beta(g, step))
        self.step = step

    def snapshot(self) -> dict:
        """{sigma_rel: {"gamma", "step", "state_dict" (CPU clones)}} of the current averages."""
        return {s: {"gamma": g, "step": self.step,
                    "state_dict": {k: v.detach().to("cpu", copy=True)
                                   for k, v in self.modules[s].state_dict().items()}}
                for s, g in zip(self.stds, self.gammas)}

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "gammas": list(self.gammas), "step": self.step,
                "modules": [self.modules[s].state_dict() for s in self.stds]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, Mapping) or not {"stds", "step", "modules"} <= set(state):
            raise ValueError("PowerEMA.load_state_dict expects the dict of PowerEMA.state_dict() "
                             "(keys 'stds', 'step', 'modules')")
        stds = tuple(float(s) for s in state["stds"])
        if stds != self.stds:
            raise ValueError(f"the saved power EMA tracks stds {stds}, this one {self.stds}")
        for s, sd in zip(self.stds, state["modules"]):
            self.modules[s].load_state_dict(sd)
        self.step = int(state["step"])


def power_profile_dot(gamma_a, t_a, gamma_b, t_b):
    """(E8): the L2 inner product of the power profiles p_{gamma_a, t_a} and p_{gamma_b, t_b} (E4), in
    float64. Numbers give a float; tensors broadcast and give a float64 tensor."""
    ga, ta, gb, tb = (torch.as_tensor(v, dtype=torch.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    if not bool(torch.all(ga + gb > -1)):
        raise ValueError(f"gamma_a + gamma_b must be > -1, got {gamma_a} + {gamma_b}")
    if not bool(torch.all(ta > 0) & torch.all(tb > 0)):
        raise ValueError(f"profile end points must be > 0, got {t_a}, {t_b}")
    m = torch.minimum(ta, tb)
    r = (ga + 1) * (gb + 1) / ((ga + gb + 1) * m) * (m / ta) ** (ga + 1) * (m / tb) ** (gb + 1)
    return float(r) if r.dim() == 0 else r


def posthoc_coefficients(gammas, steps, gamma: float, step: float) -> tuple[torch.Tensor, float]:
    """(E9): float64 coefficients x (one per snapshot profile (gammas[j], steps[j])) whose combination of
    profiles best matches p_{gamma, step} in L2, and the relative residual ||sum x_j p_j - p*|| / ||p*||."""
    g = torch.as_tensor(gammas, dtype=torch.float64).flatten()
    t = torch.as_tensor(steps, dtype=torch.float64).flatten()
    if g.numel() == 0 or t.shape != g.shape:
        raise ValueError(f"need one step per gamma and at least one snapshot, got {g.numel()} gammas and "
                         f"{t.numel()} steps")
    A = power_profile_dot(g[:, None], t[:, None], g[None, :], t[None, :])
    b = power_profile_dot(g, t, gamma, step)
    x = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
    pp = power_profile_dot(gamma, step, gamma, step)
    res2 = float(x @ A @ x - 2 * b @ x) + pp
    return x, math.sqrt(max(res2, 0.0) / pp)


def _flatten_snapshots(snapshots) -> list[dict]:
    if isinstance(snapshots, Mapping):
        snapshots = [snapshots]
    flat = []
    for i, snap in enumerate(snapshots):
        if not isinstance(snap, Mapping):
            raise TypeError(f"snapshots[{i}] must be a dict (PowerEMA.snapshot()), got {type(snap).__name__}")
        entries = [snap] if "state_dict" in snap else list(snap.values())
        for e in entries:
            if not isinstance(e, Mapping) or not {"gamma", "step", "state_dict"} <= set(e):
                raise ValueError(f"snapshots[{i}] is not a PowerEMA.snapshot() dict: each entry needs "
                                 "'gamma', 'step' and 'state_dict'")
            if int(e["step"]) < 1:
                raise ValueError(f"snapshots[{i}] was taken at step {e['step']}, before any update")
            flat.append(e)
    if not flat:
        raise ValueError("posthoc_reconstruct needs at least one snapshot")
    return flat


@torch.no_grad()
def posthoc_reconstruct(snapshots: list[dict], sigma_rel: float, step: int | None = None) -> dict:
    """EDM2 post-hoc EMA (E8, E9): the state dict of the power EMA with `sigma_rel` at `step` (default: the
    latest snapshot's step), combined by least squares from saved snapshots.

    snapshots: PowerEMA.snapshot() dicts (or their per-std entries {"gamma", "step", "state_dict"}), e.g.
    saved every few thousand steps for two stds. Floating-point tensors are combined in float64 and cast
    back to their dtype; other entries are taken from the latest snapshot. Raises ValueError if `step` lies
    after the last snapshot (nothing is known about those weights).
    """
    flat = _flatten_snapshots(snapshots)
    gamma = sigma_rel_to_gamma(sigma_rel)
    last = max(int(e["step"]) for e in flat)
    step = last if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= last:
        raise ValueError(f"step must be an int in [1, {last}] (the latest snapshot), got {step!r}")
    x, _ = posthoc_coefficients([float(e["gamma"]) for e in flat], [float(e["step"]) for e in flat],
                                gamma, float(step))
    ref = max(flat, key=lambda e: int(e["step"]))["state_dict"]
    out = {}
    for k, v in ref.items():
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
            continue
        acc = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
        for xj, e in zip(x.tolist(), flat):
            t = e["state_dict"].get(k)
            if not isinstance(t, torch.Tensor) or t.shape != v.shape:
                raise ValueError(f"snapshots disagree on entry {k!r}: every snapshot must come from the "
                                 "same model")
            acc.add_(t.to(device=v.device, dtype=torch.float64), alpha=xj)
        out[k] = acc.to(v.dtype)
    return out
