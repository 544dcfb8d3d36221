"""Tests of scm.trigflow: the TrigFlow path and its derivatives (A1, A4, A5, A7), EDM <-> TrigFlow (A6),
the time proposal and its presets (A9), and the EDM-denoiser / flow-matching / CFG wrappers (A8),
each checked numerically in float64 against closed forms derived independently in tests/scm/toys.py."""

from __future__ import annotations

import math

import pytest
import torch

from scm import trigflow as tf
from tests.scm.toys import gauss_teacher_F

SD = 0.5
pytestmark = pytest.mark.reference


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _times(B, lo=1e-3, hi=math.pi / 2 - 1e-3, seed=1):
    return lo + (hi - lo) * torch.rand(B, generator=_gen(seed), dtype=torch.float64)


def test_path_velocity_and_consistency_function():
    """(A4) is d/dt of (A1) (central difference); (A5) with F = v_t / sigma_d returns x0; (A7) with that
    F moves along the path exactly (x_s = x_s of A1 for the same x0, z)."""
    B = 7
    x0 = torch.randn(B, 3, 4, generator=_gen(1), dtype=torch.float64)
    z = SD * torch.randn(B, 3, 4, generator=_gen(2), dtype=torch.float64)
    t = _times(B)
    h = 1e-6
    fd = (tf.diffuse(x0, z, t + h) - tf.diffuse(x0, z, t - h)) / (2 * h)
    v = tf.velocity(x0, z, t)
    assert torch.allclose(fd, v, atol=1e-8, rtol=0)
    x_t = tf.diffuse(x0, z, t)
    F = v / SD  # the exact F of this one path (A3/A4)
    assert torch.allclose(tf.denoise(x_t, F, t, SD), x0, atol=1e-13, rtol=0)
    s = t * torch.rand(B, generator=_gen(3), dtype=torch.float64)
    assert torch.allclose(tf.ddim_step(x_t, F, t, s, SD), tf.diffuse(x0, z, s), atol=1e-13, rtol=0)
    # scalar times broadcast like per-sample ones
    assert torch.allclose(tf.diffuse(x0, z, 0.7), tf.diffuse(x0, z, torch.full((B,), 0.7, dtype=torch.float64)))


def test_edm_conversion():
    """(A6): sigma = sigma_d tan t and x_t = cos t x_sigma map the EDM path x0 + sigma eps onto (A1) with
    z = sigma_d eps; the conversions invert each other."""
    B = 6
    x0 = torch.randn(B, 5, generator=_gen(1), dtype=torch.float64)
    eps = torch.randn(B, 5, generator=_gen(2), dtype=torch.float64)
    t = _times(B)
    sigma = tf.edm_sigma(t, SD)
    x_sigma = x0 + sigma[:, None] * eps
    assert torch.allclose(tf.x_sigma_to_x_t(x_sigma, t), tf.diffuse(x0, SD * eps, t), atol=1e-12, rtol=0)
    assert torch.allclose(tf.x_t_to_x_sigma(tf.x_sigma_to_x_t(x_sigma, t), t), x_sigma, atol=1e-10, rtol=1e-12)
    assert torch.allclose(tf.time_from_sigma(sigma, SD), t, atol=1e-14, rtol=0)
    assert math.isclose(tf.time_from_sigma(tf.edm_sigma(0.3, SD), SD), 0.3, abs_tol=1e-15)
    assert math.isclose(tf.t_max(0.5), math.atan(160.0)) and abs(tf.t_max(0.5) - 1.5645) < 1e-4  # (A20)


def test_time_proposal_presets_and_distribution():
    """(A9): the paper's presets; log(sigma_d tan t) of the samples is N(P_mean, P_std^2); log_prob is the
    density of t (integrates to 1)."""
    expect = {"cifar10": (-1.0, 1.4), "imagenet64": (-1.0, 1.6), "imagenet64_teacher": (-0.8, 1.6),
              "imagenet512": (-0.8, 1.6), "imagenet512_teacher": (-0.4, 1.0)}
    for name, (m, s) in expect.items():
        p = tf.time_proposal(name)
        assert (p.p_mean, p.p_std) == (m, s), name
    with pytest.raises(ValueError, match="unknown preset"):
        tf.time_proposal("mnist")
    p = tf.TimeProposal(-0.8, 1.6)
    n = 200_000
    t = p.sample(n, SD, generator=_gen(4), dtype=torch.float64)
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
    tau = torch.log(SD * torch.tan(t))
    assert abs(float(tau.mean()) - p.p_mean) < 4 * p.p_std / math.sqrt(n)
    assert abs(float(tau.std()) - p.p_std) < 4 * p.p_std / math.sqrt(2 * n)
    grid = torch.linspace(1e-7, math.pi / 2 - 1e-7, 400_001, dtype=torch.float64)
    mass = torch.trapezoid(p.log_prob(grid, SD).exp(), grid)
    assert abs(float(mass) - 1) < 1e-4
    t32 = p.sample(5, SD, generator=_gen(4))
    assert t32.dtype == torch.float32 and t32.shape == (5,)


def _gauss_case(B=9, d=3, s=0.8, seed=0):
    x_t = torch.randn(B, d, generator=_gen(seed), dtype=torch.float64)
    t = torch.cat([torch.tensor([1e-3, math.pi / 2 - 1e-3], dtype=torch.float64), _times(B - 2, seed=seed + 1)])
    return x_t, t, s


def test_edm_denoiser_wrapper_gaussian():
    """EDMDenoiserAsTrigFlow of the exact EDM denoiser of N(0, s^2) data, D(x_sigma) = s^2/(s^2 + sigma^2) x_sigma,
    equals the exact TrigFlow F = E[v_t | x_t] / sigma_d derived from posterior means (toys.gauss_teacher_F)."""
    x_t, t, s = _gauss_case()

    def edm_denoiser(x_sigma, sigma):
        return s**2 / (s**2 + sigma[:, None] ** 2) * x_sigma

    F = tf.EDMDenoiserAsTrigFlow(edm_denoiser, SD)(x_t / SD, t)
    assert torch.allclose(F, gauss_teacher_F(x_t / SD, t, s, SD), atol=1e-9, rtol=1e-9)

    def edm_denoiser_b(x_sigma, sigma):  # EDM code passes sigma as (B, 1, ..., 1)
        assert sigma.shape == (x_sigma.shape[0], 1)
        return s**2 / (s**2 + sigma**2) * x_sigma

    F_b = tf.EDMDenoiserAsTrigFlow(edm_denoiser_b, SD, sigma_shape="broadcast")(x_t / SD, t)
    assert torch.allclose(F_b, F, atol=1e-12, rtol=0)


def test_edm_preconditioned_net_is_minus_F():
    """With EDM's preconditioning at the same sigma_d (c_skip, c_out, c_in of Karras et al.), the TrigFlow
    F of the denoiser is minus the raw network evaluated at x_t / sigma_d (A6)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x_t, t, _ = _gauss_case(seed=3)

    def raw(x, sigma):
        return net(torch.cat([x, torch.log(sigma)[:, None] / 4], dim=1))

    def denoiser(x_sigma, sigma):
        s2 = sigma[:, None] ** 2 + SD**2
        c_skip, c_out, c_in = SD**2 / s2, sigma[:, None] * SD / s2.sqrt(), 1 / s2.sqrt()
        return c_skip * x_sigma + c_out * raw(c_in * x_sigma, sigma)

    F = tf.EDMDenoiserAsTrigFlow(denoiser, SD)(x_t / SD, t)
    assert torch.allclose(F, -raw(x_t / SD, tf.edm_sigma(t, SD)), atol=1e-9, rtol=1e-9)


def test_flow_matching_wrapper():
    """(A8): FlowMatchingAsTrigFlow of the exact flow-matching velocity of N(0, s^2) data equals the exact
    TrigFlow F; an oracle velocity for one known pair (x0, n) gives F = v_t / sigma_d of that pair and sees
    x_fm = (1 - tau) x0 + tau n; finite at t = pi/2."""
    x_t, t, s = _gauss_case(seed=5)

    def velocity(x_fm, tau):
        tau = tau[:, None]
        return (tau - (1 - tau) * s**2) * x_fm / ((1 - tau) ** 2 * s**2 + tau**2)  # E[n - x0 | x_fm]

    F = tf.FlowMatchingAsTrigFlow(velocity, SD)(x_t / SD, t)
    assert torch.allclose(F, gauss_teacher_F(x_t / SD, t, s, SD), atol=1e-9, rtol=1e-9)

    B = 6
    x0 = torch.randn(B, 4, generator=_gen(8), dtype=torch.float64)
    n = torch.randn(B, 4, generator=_gen(9), dtype=torch.float64)
    t = torch.cat([torch.tensor([math.pi / 2], dtype=torch.float64), _times(B - 1, seed=10)])

    def oracle(x_fm, tau):
        tau_s = tau[:, None] / 1000.0
        assert torch.allclose(x_fm, (1 - tau_s) * x0 + tau_s * n, atol=1e-12)
        return n - x0

    x_t = tf.diffuse(x0, SD * n, t)
    F = tf.FlowMatchingAsTrigFlow(oracle, SD, time_scale=1000.0)(x_t / SD, t)
    assert torch.isfinite(F).all()
    assert torch.allclose(F, tf.velocity(x0, SD * n, t) / SD, atol=1e-12, rtol=0)


def test_classifier_free_guidance():
    """F = F_u + w (F_c - F_u), w a number or per sample; w = 1 calls the model once."""
    calls = []

    def model(x, t, label=None):
        calls.append(label)
        return x * (2.0 if label is None else 5.0) + t[:, None]

    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    lab = torch.ones(4)
    cfg = tf.ClassifierFreeGuidance(model, scale=3.0, uncond_kwargs={"label": None})
    F_c, F_u = 5 * x + t[:, None], 2 * x + t[:, None]
    assert torch.allclose(cfg(x, t, label=lab), F_u + 3.0 * (F_c - F_u))
    w = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(cfg(x, t, label=lab, guidance=w), F_u + w[:, None] * (F_c - F_u))
    calls.clear()
    assert torch.allclose(tf.ClassifierFreeGuidance(model, 1.0, {"label": None})(x, t, label=lab), F_c)
    assert len(calls) == 1


def test_call_model_time_vector():
    """call_model passes x_t / sigma_d and t as a (B,) vector (float32, float64 for float64 data) (A2)."""
    seen = {}

    def model(x, t, **kw):
        seen.update(x=x, t=t, kw=kw)
        return x

    x_t = torch.randn(3, 2)
    tf.call_model(model, x_t, 0.4, SD, {"label": 1})
    assert seen["t"].shape == (3,) and seen["t"].dtype == torch.float32 and torch.all(seen["t"] == 0.4)
    assert torch.allclose(seen["x"], x_t / SD) and seen["kw"] == {"label": 1}
    tf.call_model(model, x_t.double(), torch.tensor([0.1, 0.2, 0.3]), SD)
    assert seen["t"].dtype == torch.float64
