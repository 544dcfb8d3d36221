"""Samplers of TrigFlow models: consistency samplers (A20-A23) and teacher ODE samplers (A3, A7).

Every sampler has one signature (k-diffusion's habit):

    sample_x(model, x, times, *, sigma_d=0.5, generator=None, seed=None, callback=None, progress=False,
             model_kwargs=None, ...) -> tensor

- model: a TrigFlow F, called as ``model(x_t / sigma_d, t_vec, **model_kwargs)``, t_vec (B,) float32
  (c_noise(t) = t, A2).
- x: the start x_T, noise of std sigma_d (A20): ``initial_noise(shape, sigma_d)``.
- times: a strictly decreasing sequence from the start time to 0 (numbers or a 1-D tensor).
  Consistency samplers evaluate f at every time but the last and renoise to the next one (A22);
  ODE samplers integrate from times[0] to times[-1] = 0. None gives each sampler's default.
- generator / seed: the renoise noise of consistency samplers (Philox inside scm_kernels.trigflow_step,
  one stream per step keyed by a seed derived from `seed`, or drawn from `generator`, or from torch's
  default generator). ODE samplers are deterministic and ignore both.
- callback: called after every step with a dict (i, t, t_next, x, F): x the new state (x0 after the
  last step), F the model output at (x_t, t).
- progress: a tqdm bar when tqdm is installed.

Consistency sampling (all through the fused op scm_kernels.trigflow_step, A23):
    1-step (A21): x0 = f_theta(x_T, T),  T = arctan(sigma_max / sigma_d) (A20)
    2-step (A22): x_m = cos t_m x0 + sin t_m z', t_m = 1.1; x0 = f_theta(x_m, t_m)
    N-step: the same over the given times.
Teacher ODE samplers of dx/dt = sigma_d F (A3):
    DDIM (A7): x_s = cos(t - s) x_t - sin(t - s) sigma_d F(x_t, t) (exact when x0^ and z^ stay fixed;
        first order). It is (A5) at time t - s, so it runs as the denoise-only fused step.
    DPM-Solver-2 (second order; data prediction, midpoint in log-SNR lambda = log cot t): with
        x0^(x, t) = cos t x - sin t sigma_d F(x, t) (A5) and the DDIM move written as the exponential
        integrator x_s = (sin s / sin t) x_t + (sin(t - s) / sin t) x0^ (== A7),
        t_m = arctan(sqrt(tan t tan s)),  u = A7 move from t to t_m,
        x_s = (sin s / sin t) x_t + (sin(t - s) / sin t) x0^(u, t_m);
        the step into s = 0 is DDIM (x0^). Valid up to t = pi/2.
    Heun (EDM's second-order sampler in sigma = sigma_d tan t, A6): with z^ = sin t x + cos t sigma_d F,
        Euler  x~_s = cos s (x_t / cos t + (tan s - tan t) z^(x_t, t))      (== DDIM)
        Heun   x_s  = cos s (x_t / cos t + (tan s - tan t) (z^(x_t, t) + z^(x~_s, s)) / 2)
        and a plain Euler (DDIM) step into s = 0. Needs times[0] < pi/2; meant for EDM's sigma
        schedule (ode_times(schedule="edm")): on coarse grids uniform in t its first steps are poor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

import scm_kernels
from scm.trigflow import T_MID, t_max

__all__ = [
    "ConsistencySamplerGraph", "consistency_times", "initial_noise", "ode_times", "sample_consistency",
    "sample_ddim", "sample_dpm2", "sample_heun", "sample_onestep", "sample_twostep",
]

_SEED_LIMIT = 2**63
_OP = "scm.sampling"


def initial_noise(shape, sigma_d: float = 0.5, *, generator: torch.Generator | None = None, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T = z ~ N(0, sigma_d^2 I) (A20)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype) * sigma_d


def consistency_times(steps: int, sigma_d: float = 0.5, *, t_mid: float = T_MID, sigma_max: float = 80.0) -> list[float]:
    """Times of an N-step consistency sampler, ending at 0: (T, 0) for 1 step, (T, t_mid, 0) for 2 (A22);
    for N > 2, N - 1 times spaced evenly from t_mid down to t_mid / (N - 1) after T."""
    T = t_max(sigma_d, sigma_max)
    if steps < 1:
        raise ValueError(f"{_OP}.consistency_times: steps must be >= 1, got {steps}")
    if steps == 1:
        return [T, 0.0]
    mids = [t_mid * (steps - 1 - k) / (steps - 1) for k in range(steps - 1)]
    return [T] + mids + [0.0]


def ode_times(steps: int, sigma_d: float = 0.5, *, schedule: str = "edm", sigma_max: float = 80.0,
              sigma_min: float = 0.002, rho: float = 7.0) -> list[float]:
    """steps + 1 decreasing times from T = arctan(sigma_max / sigma_d) to 0 (A20, A6).

    "edm": Karras et al.'s sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i < steps, mapped by t = arctan(sigma / sigma_d), then 0. "uniform": evenly spaced in t."""
    if steps < 1:
        raise ValueError(f"{_OP}.ode_times: steps must be >= 1, got {steps}")
    T = t_max(sigma_d, sigma_max)
    if schedule == "uniform":
        return [T * (steps - i) / steps for i in range(steps + 1)]
    if schedule != "edm":
        raise ValueError(f"{_OP}.ode_times: schedule must be 'edm' or 'uniform', got {schedule!r}")
    if steps == 1:
        return [T, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)]
    return [math.atan(s / sigma_d) for s in sig] + [0.0]


def _times_list(times, name: str) -> list[float]:
    if isinstance(times, torch.Tensor):
        times = times.detach().reshape(-1).tolist()
    ts = [float(v) for v in times]
    if len(ts) < 2:
        raise ValueError(f"{name}: times must hold at least a start time and 0, got {ts}")
    if any(not math.isfinite(v) for v in ts) or ts[0] > math.pi / 2 or ts[-1] != 0.0:
        raise ValueError(f"{name}: times must be finite, start at or below pi/2 and end at 0, got {ts}")
    if any(b >= a for a, b in itertools.pairwise(ts)):
        raise ValueError(f"{name}: times must be strictly decreasing, got {ts}")
    return ts


def _mix_seed(seed: int, i: int) -> int:
    """A per-step Philox key from the user's seed (splitmix64 of seed and step), in [0, 2^63)."""
    v = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (v ^ (v >> 31)) % _SEED_LIMIT


def _step_seed(i: int, seed: int | None, generator: torch.Generator | None) -> int | None:
    if seed is not None:
        return _mix_seed(int(seed), i)
    if generator is not None:
        return int(torch.randint(0, _SEED_LIMIT - 1, (), generator=generator, device=generator.device))
    return None  # trigflow_step draws one from torch's default generator


def _progress(n: int, enabled: bool, desc: str):
    rng = range(n)
    if not enabled:
        return rng
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return rng
    return tqdm(rng, desc=desc)


def _t_vec(t: float, x: torch.Tensor) -> torch.Tensor:
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dt, device=x.device)


def _call(model, x, t, sigma_d, kw):
    return model(x / sigma_d, _t_vec(t, x), **kw)


@torch.no_grad()
def sample_consistency(model, x: torch.Tensor, times, *, sigma_d: float = 0.5,
                       generator: torch.Generator | None = None, seed: int | None = None,
                       callback: Callable | None = None, progress: bool = False, model_kwargs: dict | None = None,
                       out_uint8: bool = False, backend: str | None = None) -> torch.Tensor:
    """N-step consistency sampling (A21, A22) with the fused step (A23): for each time t_i but the last,
    F = model(x / sigma_d, t_i); x = cos t_{i+1} f + sin t_{i+1} sigma_d eps (renoise, i + 1 < N) or the
    final x0 = f = cos t_i x - sin t_i sigma_d F (uint8 pixels with out_uint8)."""
    ts = _times_list(times, f"{_OP}.sample_consistency")
    kw = model_kwargs or {}
    n = len(ts) - 1
    for i in _progress(n, progress, "consistency"):
        t, s = ts[i], ts[i + 1]
        F = _call(model, x, t, sigma_d, kw)
        if i + 1 < n:
            x = scm_kernels.trigflow_step(x, F, t, sigma_d, t_next=s, seed=_step_seed(i, seed, generator),
                                          backend=backend)
        else:
            x = scm_kernels.trigflow_step(x, F, t, sigma_d, out_uint8=out_uint8, backend=backend)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": s, "x": x, "F": F})
    return x


def sample_onestep(model, x: torch.Tensor, times=None, **kwargs) -> torch.Tensor:
    """1-step consistency sampling x0 = f_theta(x_T, T) (A21); times default (T, 0)."""
    sd = kwargs.get("sigma_d", 0.5)
    return sample_consistency(model, x, times if times is not None else consistency_times(1, sd), **kwargs)


def sample_twostep(model, x: torch.Tensor, times=None, **kwargs) -> torch.Tensor:
    """2-step consistency sampling (A22); times default (T, 1.1, 0)."""
    sd = kwargs.get("sigma_d", 0.5)
    return sample_consistency(model, x, times if times is not None else consistency_times(2, sd), **kwargs)


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, times, *, sigma_d: float = 0.5, generator: torch.Generator | None = None,
                seed: int | None = None, callback: Callable | None = None, progress: bool = False,
                model_kwargs: dict | None = None, backend: str | None = None) -> torch.Tensor:
    """DDIM in TrigFlow (A7): x_s = cos(t - s) x_t - sin(t - s) sigma_d F(x_t / sigma_d, t), first order.
    Each move is (A5) at time t - s: the fused trigflow_step in its denoise-only mode."""
    del generator, seed  # deterministic
    ts = _times_list(times, f"{_OP}.sample_ddim")
    kw = model_kwargs or {}
    for i in _progress(len(ts) - 1, progress, "ddim"):
        t, s = ts[i], ts[i + 1]
        F = _call(model, x, t, sigma_d, kw)
        x = scm_kernels.trigflow_step(x, F, t - s, sigma_d, backend=backend)  # (A7)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": s, "x": x, "F": F})
    return x


@torch.no_grad()
def sample_dpm2(model, x: torch.Tensor, times, *, sigma_d: float = 0.5, generator: torch.Generator | None = None,
                seed: int | None = None, callback: Callable | None = None, progress: bool = False,
                model_kwargs: dict | None = None, backend: str | None = None) -> torch.Tensor:
    """DPM-Solver-2 in TrigFlow (second order, see the module docstring): per step a DDIM move (A7, fused)
    to the log-SNR midpoint t_m, the data prediction x0^ there (A5, fused), and the exponential-integrator
    update x_s = (sin s / sin t) x_t + (sin(t - s) / sin t) x0^(u, t_m); DDIM into s = 0. Two model calls
    per step but the last."""
    del generator, seed  # deterministic
    ts = _times_list(times, f"{_OP}.sample_dpm2")
    kw = model_kwargs or {}
    for i in _progress(len(ts) - 1, progress, "dpm2"):
        t, s = ts[i], ts[i + 1]
        F = _call(model, x, t, sigma_d, kw)
        if s == 0:
            x = scm_kernels.trigflow_step(x, F, t, sigma_d, backend=backend)  # (A5)
        else:
            t_m = math.atan(math.sqrt(math.tan(t) * math.tan(s)))
            u = scm_kernels.trigflow_step(x, F, t - t_m, sigma_d, backend=backend)  # (A7) to t_m
            x0 = scm_kernels.trigflow_step(u, _call(model, u, t_m, sigma_d, kw), t_m, sigma_d, backend=backend)
            x = (math.sin(s) / math.sin(t)) * x + (math.sin(t - s) / math.sin(t)) * x0
        if callback is not None:
            callback({"i": i, "t": t, "t_next": s, "x": x, "F": F})
    return x


@torch.no_grad()
def sample_heun(model, x: torch.Tensor, times, *, sigma_d: float = 0.5, generator: torch.Generator | None = None,
                seed: int | None = None, callback: Callable | None = None, progress: bool = False,
                model_kwargs: dict | None = None) -> torch.Tensor:
    """EDM's Heun sampler (second order) written in TrigFlow (see the module docstring): Euler in
    sigma = sigma_d tan t with the noise prediction z^ = sin t x + cos t sigma_d F, corrected by the
    trapezoid rule; the step into s = 0 is plain Euler (DDIM). Two model calls per step but the last."""
    del generator, seed  # deterministic
    ts = _times_list(times, f"{_OP}.sample_heun")
    if ts[0] >= math.pi / 2:
        raise ValueError(f"{_OP}.sample_heun: times[0] must be < pi/2 (sigma = sigma_d tan t finite), got {ts[0]}")
    kw = model_kwargs or {}
    for i in _progress(len(ts) - 1, progress, "heun"):
        t, s = ts[i], ts[i + 1]
        F = _call(model, x, t, sigma_d, kw)
        z_hat = math.sin(t) * x + (math.cos(t) * sigma_d) * F
        x_sig = x / math.cos(t) + (math.tan(s) - math.tan(t)) * z_hat  # Euler in sigma (A6) == DDIM
        if s > 0:
            x_e = math.cos(s) * x_sig
            F_e = _call(model, x_e, s, sigma_d, kw)
            z_e = math.sin(s) * x_e + (math.cos(s) * sigma_d) * F_e
            x_sig = x / math.cos(t) + (math.tan(s) - math.tan(t)) * 0.5 * (z_hat + z_e)
        x = (math.cos(s) * x_sig).to(x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": s, "x": x, "F": F})
    return x


class ConsistencySamplerGraph:
    """The consistency sampler (default: 2-step, A22) as one CUDA graph, with the time conditioning
    computed once.

    At construction: the (B,) time vectors of every step are built once (static buffers), and
    `time_kwargs(t_vec)` (optional, e.g. ``lambda t: {"emb": net.embed_time(t)}``) is evaluated once
    per step and its outputs kept as static model keyword arguments; then a few eager warm-up runs on a
    side stream and the capture of: model calls, the renoise draws (torch.randn inside the graph: CUDA
    graphs advance the generator's offset at every replay, so each call gets fresh noise; the Philox
    seed of the in-kernel path would be frozen into the graph) and the fused steps (A23).
    A call copies `noise` (default: fresh N(0, sigma_d^2)) and the tensor model_kwargs into the static
    inputs, replays, and returns a copy of the output.

    `enabled=False` (the default off CUDA) runs the same steps eagerly: the CPU path and a reference
    for the graphed one."""

    def __init__(self, model, noise: torch.Tensor, times: Sequence[float] | None = None, *, sigma_d: float = 0.5,
                 model_kwargs: dict | None = None, time_kwargs: Callable | None = None, out_uint8: bool = False,
                 enabled: bool | None = None, warmup: int = 2):
        self.model = model
        self.sigma_d = float(sigma_d)
        self.times = _times_list(times if times is not None else consistency_times(2, sigma_d),
                                 f"{_OP}.ConsistencySamplerGraph")
        self.out_uint8 = out_uint8
        self.static_noise = noise.detach().clone()
        self.static_kwargs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in (model_kwargs or {}).items()}
        x = self.static_noise
        # the time conditioning, computed once
        self.t_vecs = [_t_vec(t, x) for t in self.times[:-1]]
        self.step_kwargs = [dict(time_kwargs(tv)) if time_kwargs is not None else {} for tv in self.t_vecs]
        self.enabled = (x.device.type == "cuda") if enabled is None else bool(enabled)
        if self.enabled and x.device.type != "cuda":
            raise ValueError(f"{_OP}.ConsistencySamplerGraph: CUDA graph capture needs CUDA tensors, got noise on "
                             f"{x.device} (pass enabled=False)")
        self.graph = None
        self.static_out = None
        if self.enabled:
            stream = torch.cuda.Stream(device=x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(max(1, warmup)):
                    self._run()
            torch.cuda.current_stream(x.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.static_out = self._run()

    def _run(self) -> torch.Tensor:
        x, sd, ts = self.static_noise, self.sigma_d, self.times
        n = len(ts) - 1
        for i in range(n):
            F = self.model(x / sd, self.t_vecs[i], **self.static_kwargs, **self.step_kwargs[i])
            if i + 1 < n:
                eps = torch.randn_like(x)
                x = scm_kernels.trigflow_step(x, F, ts[i], sd, t_next=ts[i + 1], noise=eps)
            else:
                x = scm_kernels.trigflow_step(x, F, ts[i], sd, out_uint8=self.out_uint8)
        return x

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        if noise is None:
            self.static_noise.normal_().mul_(self.sigma_d)
        else:
            if noise.shape != self.static_noise.shape:
                raise ValueError(f"{_OP}.ConsistencySamplerGraph: noise must have the captured shape "
                                 f"{tuple(self.static_noise.shape)}, got {tuple(noise.shape)}")
            self.static_noise.copy_(noise)
        for k, v in model_kwargs.items():
            cur = self.static_kwargs.get(k)
            if not isinstance(cur, torch.Tensor) or not isinstance(v, torch.Tensor) or v.shape != cur.shape:
                raise ValueError(f"{_OP}.ConsistencySamplerGraph: model_kwargs[{k!r}] must be a tensor of the "
                                 "captured shape (give it at construction)")
            cur.copy_(v)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.static_out.clone()
