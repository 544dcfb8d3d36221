"""Tests of scm.sampling on closed-form cases: Gaussian data N(0, s^2), whose exact consistency function
f(x_t, t) = s x_t / sqrt(cos^2 t s^2 + sin^2 t sigma_d^2) and exact diffusion F are known
(tests/scm/toys.py). Consistency samplers (A21, A22, A23) with the exact consistency F are exact;
DDIM (A7) converges at first order and Heun at second order to the exact ODE map; seeds, generators,
callbacks, uint8 output, the shared signature, argument errors, and the CUDA-graph sampler (eager
path here; graph capture on a GPU)."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

from scm import sampling as smp
from scm.trigflow import t_max
from scm_kernels.trigflow_step import reference as step_ref
from tests.scm.toys import gauss_consistency_F, gauss_slope, gauss_teacher_F

SD = 0.5
S = 0.8  # data std of the closed-form cases
pytestmark = pytest.mark.reference


def _noise(B, d=3, seed=0, dtype=torch.float64):
    return smp.initial_noise((B, d), SD, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def consistency_model(x, t):
    return gauss_consistency_F(x, t, S, SD)


def teacher(x, t):
    return gauss_teacher_F(x, t, S, SD)


def test_times_helpers():
    T = t_max(SD)
    assert smp.consistency_times(1, SD) == [T, 0.0]
    assert smp.consistency_times(2, SD) == [T, 1.1, 0.0]
    ts = smp.consistency_times(4, SD)
    assert ts[0] == T and ts[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(ts))
    for sched in ("edm", "uniform"):
        ts = smp.ode_times(10, SD, schedule=sched)
        assert len(ts) == 11 and ts[0] == pytest.approx(T) and ts[-1] == 0.0
        assert all(a > b for a, b in itertools.pairwise(ts))
    assert smp.ode_times(10, SD)[-2] == pytest.approx(math.atan(0.002 / SD))


def test_onestep_and_twostep_exact_for_gaussian():
    """With the exact consistency F, 1 step returns slope(T) x_T (A21) and 2 steps return slope(t_m) x_m
    with x_m = cos t_m x0 + sin t_m sigma_d eps (A22), eps the Philox stream of the step's seed (A23)."""
    z = _noise(64)
    T = t_max(SD)
    x1 = smp.sample_onestep(consistency_model, z, sigma_d=SD, backend="reference")
    assert torch.allclose(x1, gauss_slope(T, S, SD) * z, atol=1e-12, rtol=0)
    # the automatic backend (the C++ kernel here) computes in float32
    assert torch.allclose(smp.sample_onestep(consistency_model, z, sigma_d=SD), x1, atol=1e-6, rtol=1e-6)
    seen = []
    x2 = smp.sample_twostep(consistency_model, z, sigma_d=SD, seed=123, callback=seen.append, backend="reference")
    x_m = seen[0]["x"]
    eps = step_ref.philox_noise_like(z, smp._mix_seed(123, 0), torch.float64)
    assert torch.allclose(x_m, math.cos(1.1) * x1 + math.sin(1.1) * SD * eps, atol=1e-12, rtol=0)
    assert torch.allclose(x2, gauss_slope(1.1, S, SD) * x_m, atol=1e-12, rtol=0)
    assert [c["t"] for c in seen] == [T, 1.1] and seen[1]["x"] is x2


def test_consistency_samples_have_the_data_std():
    """1-, 2- and 4-step samples of the exact consistency model have std S (200k samples, within 1%)."""
    z = _noise(200_000, d=1, seed=7, dtype=torch.float32)
    for steps in (1, 2, 4):
        x = smp.sample_consistency(consistency_model, z, smp.consistency_times(steps, SD), sigma_d=SD, seed=steps)
        assert abs(float(x.std()) / S - 1) < 0.01, steps


def test_ode_samplers_converge_at_their_order():
    """DDIM (A7), DPM-Solver-2 and Heun with the exact diffusion F map x_T to the exact ODE solution
    f(x_T, T) = slope(T) x_T: on EDM's schedule the errors shrink about 2x (DDIM, first order) and 4x
    (DPM-Solver-2, Heun: second order) when the steps double."""
    z = _noise(16)
    target = gauss_slope(t_max(SD), S, SD) * z
    samplers = {"ddim": (smp.sample_ddim, 1), "dpm2": (smp.sample_dpm2, 2), "heun": (smp.sample_heun, 2)}
    errs = {k: [] for k in samplers}
    for n in (16, 32, 64):
        ts = smp.ode_times(n, SD)
        for name, (fn, _) in samplers.items():
            extra = {} if name == "heun" else {"backend": "reference"}
            errs[name].append(float((fn(teacher, z, ts, sigma_d=SD, **extra) - target).abs().max()))
    for name, (_, order) in samplers.items():
        e = errs[name]
        for a, b in itertools.pairwise(e):
            assert 0.85 * 2**order < a / b < 1.2 * 2**order, (name, e)
    assert errs["dpm2"][-1] < 5e-3 * float(target.abs().max())
    # the automatic backend (float32 kernels) agrees to float32 rounding; DPM-Solver-2 also runs from pi/2
    ts = smp.ode_times(32, SD)
    assert torch.allclose(smp.sample_dpm2(teacher, z, ts, sigma_d=SD),
                          smp.sample_dpm2(teacher, z, ts, sigma_d=SD, backend="reference"), atol=1e-5, rtol=0)
    x = smp.sample_dpm2(teacher, z, [math.pi / 2] + ts[1:], sigma_d=SD, backend="reference")
    assert float((x - target).abs().max()) < 2 * errs["dpm2"][1]


def test_ddim_single_step_is_exact_on_a_path():
    """A7 with the path's own F moves exactly along it: one DDIM step from T to 0 of the oracle F of a
    fixed (x0, z) returns x0."""
    x0 = torch.randn(5, 3, dtype=torch.float64)
    z = _noise(5, seed=3)
    T = t_max(SD)

    def oracle(x, t):
        tt = t[:, None]
        return (torch.cos(tt) * z - torch.sin(tt) * x0) / SD

    x_T = math.cos(T) * x0 + math.sin(T) * z
    assert torch.allclose(smp.sample_ddim(oracle, x_T, [T, 0.7, 0.0], sigma_d=SD, backend="reference"), x0,
                          atol=1e-12, rtol=0)
    assert torch.allclose(smp.sample_ddim(oracle, x_T, [T, 0.7, 0.0], sigma_d=SD), x0, atol=1e-6, rtol=0)


def test_seeds_generators_kwargs_and_uint8():
    z = _noise(32, dtype=torch.float32)
    a = smp.sample_twostep(consistency_model, z, sigma_d=SD, seed=5)
    assert torch.equal(a, smp.sample_twostep(consistency_model, z, sigma_d=SD, seed=5))
    assert not torch.equal(a, smp.sample_twostep(consistency_model, z, sigma_d=SD, seed=6))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(smp.sample_twostep(consistency_model, z, sigma_d=SD, generator=g1),
                       smp.sample_twostep(consistency_model, z, sigma_d=SD, generator=g2))
    torch.manual_seed(3)
    b = smp.sample_twostep(consistency_model, z, sigma_d=SD)
    torch.manual_seed(3)
    assert torch.equal(b, smp.sample_twostep(consistency_model, z, sigma_d=SD))
    px = smp.sample_twostep(consistency_model, z, sigma_d=SD, seed=5, out_uint8=True)
    assert px.dtype == torch.uint8 and torch.equal(px, step_ref.to_pixel(a))
    seen = {}

    def model(x, t, label=None):
        seen["label"] = label
        return consistency_model(x, t)

    smp.sample_onestep(model, z, sigma_d=SD, model_kwargs={"label": 7})
    assert seen["label"] == 7


def test_shared_signature():
    names = ["model", "x", "times", "sigma_d", "generator", "seed", "callback", "progress"]
    for fn in (smp.sample_consistency, smp.sample_ddim, smp.sample_dpm2, smp.sample_heun):
        params = list(inspect.signature(fn).parameters)
        assert params[: len(names)] == names, fn.__name__
    for fn in (smp.sample_onestep, smp.sample_twostep):
        assert list(inspect.signature(fn).parameters)[:3] == ["model", "x", "times"]


def test_progress_bar_runs():
    z = _noise(4)
    x = smp.sample_ddim(teacher, z, smp.ode_times(3, SD), sigma_d=SD, progress=True)
    assert torch.isfinite(x).all()


def test_bad_times():
    z = _noise(4)
    for times, msg in (([1.0], "at least"), ([1.0, 0.5], "end at 0"), ([1.0, 1.2, 0.0], "decreasing"),
                       ([2.0, 0.0], "pi/2"), ([float("nan"), 0.0], "finite")):
        with pytest.raises(ValueError, match=msg):
            smp.sample_consistency(consistency_model, z, times, sigma_d=SD)
    with pytest.raises(ValueError, match="< pi/2"):
        smp.sample_heun(teacher, z, [math.pi / 2, 0.0], sigma_d=SD)


def test_graph_sampler_eager_path():
    """enabled=False (the path off CUDA) runs the captured steps eagerly: time vectors and time_kwargs
    computed once, renoise from torch.randn_like; equals a hand-written 2-step loop with the same RNG."""
    z = _noise(16, dtype=torch.float32)
    calls = []

    def time_kwargs(t_vec):
        calls.append(float(t_vec[0]))
        return {"scale": torch.full_like(t_vec, 1.0)}

    def model(x, t, scale):
        return consistency_model(x, t) * scale[:, None]

    sampler = smp.ConsistencySamplerGraph(model, z, sigma_d=SD, time_kwargs=time_kwargs)
    assert sampler.graph is None and calls == pytest.approx([t_max(SD), 1.1])
    torch.manual_seed(11)
    out = sampler(z)
    torch.manual_seed(11)
    T = t_max(SD)
    x0 = math.cos(T) * z - math.sin(T) * SD * consistency_model(z / SD, torch.full((16,), T))
    x_m = math.cos(1.1) * x0 + math.sin(1.1) * SD * torch.randn_like(z)
    ref = math.cos(1.1) * x_m - math.sin(1.1) * SD * consistency_model(x_m / SD, torch.full((16,), 1.1))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # not recomputed per call
    fresh = sampler()  # fresh noise
    assert fresh.shape == z.shape and not torch.equal(fresh, out)
    with pytest.raises(ValueError, match="captured shape"):
        sampler(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="CUDA"):
        smp.ConsistencySamplerGraph(model, z, enabled=True, time_kwargs=time_kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_sampler_cuda():
    """The whole 2-step sampler captured as one CUDA graph: replays draw fresh renoise, the 1-step
    graph of a deterministic model equals the eager sampler, and the 2-step samples keep the data std."""
    dev = torch.device("cuda")
    z = smp.initial_noise((100_000, 1), SD, device=dev)
    one = smp.ConsistencySamplerGraph(consistency_model, z, smp.consistency_times(1, SD), sigma_d=SD)
    assert one.graph is not None
    assert torch.allclose(one(z), smp.sample_onestep(consistency_model, z, sigma_d=SD), atol=1e-6, rtol=1e-5)
    two = smp.ConsistencySamplerGraph(consistency_model, z, sigma_d=SD)
    a, b = two(z), two(z)
    assert not torch.equal(a, b)  # fresh renoise at every replay
    for x in (a, b, two()):
        assert abs(float(x.std()) / S - 1) < 0.02
