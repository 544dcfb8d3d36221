"""Tests of scm.ema: the half-life EMA (E1-E3), the sigma_rel <-> gamma relation of EDM2 (E5), the power EMA
as an exact weighted average of the trajectory (E6, E7), the closed-form profile inner products (E8) and
the post-hoc reconstruction of another sigma_rel from saved snapshots (E9)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from scm.checkpoint import load_checkpoint, save_atomic
from scm.ema import (EMA, PowerEMA, gamma_to_sigma_rel, posthoc_coefficients, posthoc_reconstruct,
                     power_profile_dot, sigma_rel_to_gamma)

pytestmark = pytest.mark.reference


def _net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).to(dtype)


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_of_a_constant_is_that_constant():
    model = _net()
    ref = copy.deepcopy(model.state_dict())
    for ema in (EMA(model, 0.5), EMA(model, 0.0), EMA(model, 10.0, rampup_ratio=0.05)):
        nimg = 0
        for batch in (1, 7, 128, 4096, 3):
            ema.update(model, nimg, batch)
            nimg += batch
        for k, v in ema.module.state_dict().items():
            assert torch.equal(v, ref[k]), k
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("batch", [1, 40, 250])
def test_ema_halflife_halves_a_step_response(batch):
    """Parameters jump from 0 to 1: after halflife images the average is 1/2, after two 3/4, whatever the
    batch size (1000 images = 1 kimg)."""
    model = _net(torch.float64)
    _set(model, 0.0)
    ema = EMA(model, halflife_kimg=1.0)
    _set(model, 1.0)
    nimg = 0
    for target in (0.5, 0.75):
        for _ in range(1000 // batch):
            ema.update(model, nimg, batch)
            nimg += batch
        for p in ema.module.parameters():
            assert torch.allclose(p, torch.full_like(p, target), rtol=0, atol=1e-12)


def test_ema_rampup_caps_the_halflife():
    """(E2): with the ramp-up the update at nimg uses halflife min(H, nimg * ratio): equal to a plain EMA
    of that half-life early on, and to the plain EMA of H once nimg * ratio >= H."""
    model = _net(torch.float64)
    H_kimg, ratio, batch = 2.0, 0.05, 64
    for nimg, eff_kimg in ((8000, 0.4), (200_000, 2.0)):
        _set(model, 0.0)
        a, b = EMA(model, H_kimg, rampup_ratio=ratio), EMA(model, eff_kimg)
        _set(model, 1.0)
        a.update(model, nimg, batch)
        b.update(model, nimg, batch)
        for pa, pb in zip(a.module.parameters(), b.module.parameters()):
            assert torch.equal(pa, pb)
    assert EMA(model, H_kimg, rampup_ratio=ratio).beta(0, batch) == 0.0  # nimg = 0: the average is the model


def test_ema_copies_buffers_and_survives_a_checkpoint(tmp_path):
    model = _net()
    ema = EMA(model, 0.1)
    model.train()
    model(torch.randn(16, 5))  # changes BatchNorm running statistics (buffers)
    _set(model, 2.0)
    ema.update(model, 0, 32)
    for name, buf in model.named_buffers():
        assert torch.equal(dict(ema.module.named_buffers())[name], buf), name
    save_atomic({"ema": ema.state_dict()}, tmp_path / "e.pt")
    other = EMA(_net(seed=1), 0.1)
    other.load_state_dict(load_checkpoint(tmp_path / "e.pt")["ema"])
    for (k, v), w in zip(ema.module.state_dict().items(), other.module.state_dict().values()):
        assert torch.equal(v, w), k


def test_ema_argument_errors():
    model = _net()
    with pytest.raises(ValueError, match="halflife_kimg"):
        EMA(model, -1.0)
    with pytest.raises(ValueError, match="rampup_ratio"):
        EMA(model, 1.0, rampup_ratio=float("nan"))
    with pytest.raises(ValueError, match="batch_images"):
        EMA(model, 1.0).update(model, 0, 0)
    with pytest.raises(ValueError, match="do not match"):
        EMA(model, 1.0).update(nn.Linear(5, 7), 0, 1)


def _sigma_rel_by_quadrature(gamma, n=400_000):
    """Std of u = tau / t under the density (gamma + 1) u^gamma on (0, 1] by the midpoint rule, independent
    of the closed form (E5). For gamma < 0 the density is singular at 0, so there u = v^(1 / (gamma + 1))
    with v uniform (inverse CDF) and the moments are averages over v."""
    v = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if gamma < 0:
        u = v ** (1.0 / (gamma + 1))
        return float((u - u.mean()).square().mean().sqrt())
    w = (gamma + 1) * v ** gamma / n
    mean = (w * v).sum()
    return float((w * (v - mean) ** 2).sum().sqrt())


def test_sigma_rel_gamma_relation():
    """(E5) matches the std of the profile measured by quadrature; the two maps are inverses; the EDM2
    values sigma_rel = 0.05 -> gamma = 16.97 and 0.10 -> 6.94 come out."""
    for gamma in (-0.3, 0.0, 1.5, 6.94, 16.97, 50.0):
        assert gamma_to_sigma_rel(gamma) == pytest.approx(_sigma_rel_by_quadrature(gamma), rel=1e-6)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(1 / math.sqrt(12)) == pytest.approx(0.0, abs=1e-12)  # uniform average
    for s in torch.linspace(0.002, 0.3, 60, dtype=torch.float64).tolist():
        g = sigma_rel_to_gamma(s)
        assert g >= (math.sqrt(5) - 3) / 2
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-14)
    for g in (-0.38, 0.0, 3.0, 16.97, 1000.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)
    for bad in (0.0, -0.1, 0.31, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def _trajectory(T, D, seed=0):
    """A synthetic parameter trajectory (T, D): slow sinusoids + a random walk + per-step noise."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(D, generator=g, dtype=torch.float64) * 6
    ph = torch.rand(D, generator=g, dtype=torch.float64) * 6
    tau = torch.arange(1, T + 1, dtype=torch.float64)[:, None] / T
    walk = torch.cumsum(torch.randn(T, D, generator=g, dtype=torch.float64), 0) * 0.05
    noise = torch.randn(T, D, generator=g, dtype=torch.float64)
    return torch.sin(2 * math.pi * f * tau + ph) + walk + 0.3 * noise


def _run_power_ema(traj, stds, snapshot_every=0):
    T, D = traj.shape
    model = nn.Linear(D, 1, bias=False).double()
    pe = PowerEMA(model, stds=stds)
    snaps = []
    for i in range(1, T + 1):
        with torch.no_grad():
            model.weight.copy_(traj[i - 1][None])
        pe.update(model, i)
        if snapshot_every and i % snapshot_every == 0:
            snaps.append(pe.snapshot())
    return pe, snaps


def test_power_ema_is_the_exact_weighted_average():
    """(E7): after t updates the average is sum_i w_i theta_i with w_i = (i^(g+1) - (i-1)^(g+1)) / t^(g+1),
    the integral of the tau^gamma profile over each step (float64, to rounding)."""
    T = 300
    traj = _trajectory(T, 16, seed=3)
    stds = (0.05, 0.1, 0.25)
    pe, _ = _run_power_ema(traj, stds)
    i = torch.arange(1, T + 1, dtype=torch.float64)
    for s in stds:
        g = sigma_rel_to_gamma(s)
        w = (i ** (g + 1) - (i - 1) ** (g + 1)) / float(T) ** (g + 1)
        assert float(w.sum()) == pytest.approx(1.0, rel=1e-13)
        direct = w @ traj
        got = pe.modules[s].weight[0]
        assert torch.allclose(got, direct, rtol=1e-12, atol=1e-13), float((got - direct).abs().max())
        # weights proportional to i^gamma are the O(1/t) approximation of these
        w_pow = i ** g / (i ** g).sum()
        assert 0 < float((w - w_pow).abs().sum()) < 10 * (g + 1) / T


def test_power_ema_state_dict_resumes_exactly(tmp_path):
    traj = _trajectory(60, 8, seed=4)
    full, _ = _run_power_ema(traj, (0.05, 0.1))
    half, _ = _run_power_ema(traj[:30], (0.05, 0.1))
    save_atomic({"power_ema": half.state_dict()}, tmp_path / "p.pt")
    model = nn.Linear(8, 1, bias=False).double()
    resumed = PowerEMA(model, stds=(0.05, 0.1))
    resumed.load_state_dict(load_checkpoint(tmp_path / "p.pt")["power_ema"])
    assert resumed.step == 30
    for i in range(31, 61):
        with torch.no_grad():
            model.weight.copy_(traj[i - 1][None])
        resumed.update(model, i)
    for s in (0.05, 0.1):
        assert torch.equal(resumed.modules[s].weight, full.modules[s].weight)
    with pytest.raises(ValueError, match="stds"):
        PowerEMA(model, stds=(0.05,)).load_state_dict(half.state_dict())
    with pytest.raises(ValueError, match="step"):
        resumed.update(model, 0)


def test_profile_inner_product_closed_form():
    """(E8) against midpoint quadrature of the two profiles (E4)."""
    n = 2_000_000
    for ga, ta, gb, tb in ((16.97, 1000.0, 6.94, 700.0), (0.0, 3.0, 0.0, 5.0), (2.5, 10.0, 40.0, 10.0),
                           (-0.3, 50.0, 1.0, 20.0)):
        T = max(ta, tb)
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) * (T / n)
        pa = torch.where(tau <= ta, (ga + 1) * tau ** ga / ta ** (ga + 1), 0.0)
        pb = torch.where(tau <= tb, (gb + 1) * tau ** gb / tb ** (gb + 1), 0.0)
        quad = float((pa * pb).sum() * (T / n))
        assert power_profile_dot(ga, ta, gb, tb) == pytest.approx(quad, rel=2e-4)
        swapped = power_profile_dot(gb, tb, ga, ta)
        assert power_profile_dot(ga, ta, gb, tb) == pytest.approx(swapped, rel=1e-14)
    # huge step counts do not overflow
    assert math.isfinite(power_profile_dot(96.99, 1e9, 96.99, 9.9e8))


def test_posthoc_reconstructs_another_std():
    """Snapshots of sigma_rel 0.05 and 0.10 every 100 of 1000 steps reproduce directly tracked power EMAs of
    0.07 (inside the range) and 0.15 (outside) at step 1000 to well under 3% of the spread between the
    two tracked averages (measured here: 0.4% and 1.0%)."""
    T = 1000
    traj = _trajectory(T, 64)
    pe, snaps = _run_power_ema(traj, (0.05, 0.1), snapshot_every=100)
    direct, _ = _run_power_ema(traj, (0.07, 0.15))
    spread = (pe.modules[0.05].weight - pe.modules[0.1].weight).norm()
    for s, bound in ((0.07, 0.01), (0.15, 0.03)):
        rec = posthoc_reconstruct(snaps, s)["weight"]
        err = (rec - direct.modules[s].weight).norm()
        assert err / spread < bound, (s, float(err / spread))
        assert err / direct.modules[s].weight.norm() < bound / 3
        # and the least-squares profile fit behind it is close as well
        flat = [e for snap in snaps for e in snap.values()]
        _, resid = posthoc_coefficients([e["gamma"] for e in flat], [e["step"] for e in flat],
                                        sigma_rel_to_gamma(s), T)
        assert resid < 0.03
    # the reconstruction is not trivially one of the inputs
    assert (posthoc_reconstruct(snaps, 0.07)["weight"] - pe.modules[0.05].weight).norm() > 0.1 * spread


def test_posthoc_reproduces_a_tracked_std_and_round_trips_through_a_checkpoint(tmp_path):
    traj = _trajectory(400, 32, seed=1)
    pe, snaps = _run_power_ema(traj, (0.05, 0.1), snapshot_every=50)
    save_atomic({"snapshots": snaps}, tmp_path / "s.pt")
    loaded = load_checkpoint(tmp_path / "s.pt")["snapshots"]
    for s in (0.05, 0.1):
        rec = posthoc_reconstruct(loaded, s)["weight"]
        assert torch.allclose(rec, pe.modules[s].weight, rtol=0, atol=1e-10)
        assert rec.dtype == torch.float64
    # an earlier step that has snapshots is reproduced too (step 200 of the 0.1 average)
    mid, _ = _run_power_ema(traj[:200], (0.1,))
    rec = posthoc_reconstruct(loaded, 0.1, step=200)["weight"]
    assert torch.allclose(rec, mid.modules[0.1].weight, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="step"):
        posthoc_reconstruct(loaded, 0.1, step=401)
    with pytest.raises(ValueError, match="snapshot"):
        posthoc_reconstruct([], 0.1)
