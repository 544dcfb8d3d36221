"""Tests of scm.losses: SCMLoss against an independent float64 implementation of Algorithm 1 (sCT, sCD,
sCD with classifier-free guidance; both JVP paths; reference and fused backends), the sCM gradient as
the dt -> 0 limit of the discrete consistency-loss gradient (algorithm.md sec. 7), dropout masks shared
by the JVP and gradient passes, the semi-continuous option (A18), tangent warmup (A15), non-finite
masking, autocast, the diffusion loss (A4), argument errors; and training from scratch on closed-form
data: 1-D Gaussian (sCT) and a 2-D Gaussian mixture (sCD from an exact teacher)."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from torch import nn

from scm.losses import AdaptiveWeighting, SCMLoss, TrigFlowDiffusionLoss, model_jvp
from scm.sampling import initial_noise, ode_times, sample_dpm2, sample_onestep, sample_twostep
from scm.trigflow import TimeProposal
from tests.scm.toys import MixtureTeacher, ToyMLP, gauss_slope, gauss_teacher_F, sliced_wasserstein

SD = 0.5
pytestmark = pytest.mark.reference


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(B=6, d=3, seed=0, dtype=torch.float64):
    x0 = torch.randn(B, d, generator=_gen(seed), dtype=dtype) * 0.7
    z = torch.randn(B, d, generator=_gen(seed + 1), dtype=dtype) * SD
    t = (0.05 + 1.45 * torch.rand(B, generator=_gen(seed + 2), dtype=torch.float64)).to(dtype)
    return x0, z, t


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _rel(a, b):
    num = max(float((x - y).abs().max()) for x, y in zip(a, b))
    den = max(float(y.abs().max()) for y in b)
    return num / den


# ---------------------------------------------------------------------------------------------
# Algorithm 1, written independently in float64
# ---------------------------------------------------------------------------------------------
def algorithm1_float64(model, weighting, x0, z, t, *, r, c, teacher=None, w=None, label=None):
    """The paper's Algorithm 1 as printed: dF/dt formed explicitly (reverse-mode double-backward, no
    rearrangement), g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF/dt),
    g <- g / (||g|| + c), L = mean(e^w / D ||F - F^- - g||^2 - w) with w = -logvar from the weighting
    MLP applied to a time embedding computed here."""
    D = x0[0].numel()
    ct, st = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = ct * x0 + st * z
    if teacher is None:
        dxdt = ct * z - st * x0
    else:
        Fc = teacher(x_t / SD, t, label=label)
        if w is not None:
            Fu = teacher(x_t / SD, t, label=None)
            Fc = Fu + w[:, None] * (Fc - Fu)
        dxdt = SD * Fc.detach()
    kw = {"label": label} if label is not None else {}
    if w is not None:
        kw["guidance"] = w
    _, dFdt = torch.autograd.functional.jvp(lambda xx, tt: model(xx, tt, **kw), (x_t / SD, t),
                                            (dxdt / SD, torch.ones_like(t)))
    F = model(x_t / SD, t, **kw)
    Fm = F.detach()
    g = -ct**2 * (SD * Fm - dxdt) - r * ct * st * (x_t + SD * dFdt)
    g = g / (g.norm(dim=1, keepdim=True) + c)
    if weighting is None:
        return ((F - Fm - g) ** 2).sum(1).div(D).mean()
    half = weighting.dim // 2
    omega = torch.exp(-math.log(weighting.max_period) * torch.arange(half, dtype=torch.float64) / half)
    theta = weighting.time_scale * t[:, None] * omega[None]
    emb = torch.cat([torch.cos(theta), torch.sin(theta)], dim=1)
    w_phi = -weighting.mlp(emb)[:, 0]
    return (torch.exp(w_phi) / D * ((F - Fm - g) ** 2).sum(1) - w_phi).mean()


def _perturb(module, seed):
    """Random non-zero weights (the weighting's last layer starts at zero)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("variant", ["sct", "scd", "scd_cfg"])
@pytest.mark.parametrize("jvp", ["func", "layer"])
@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("passes", ["separate", "merged"])
def test_scm_loss_equals_float64_algorithm1(variant, jvp, backend, passes):
    torch.manual_seed(0)
    cfg = variant == "scd_cfg"
    model = ToyMLP(3, 24, 8, embed="reference64", n_cond=2 if cfg else 0, guidance_input=cfg, dtype=torch.float64)
    teacher = None
    if variant != "sct":
        teacher = ToyMLP(3, 16, 8, embed="reference64", n_cond=2 if cfg else 0, dtype=torch.float64)
    weighting = AdaptiveWeighting(dim=16, hidden=8, time_scale=3.0).double()
    _perturb(weighting, 5)
    x0, z, t = _case(8)  # B = 8: the float32 upstream gradient 1/B of the mean is exact
    label = torch.randn(8, 2, generator=_gen(9), dtype=torch.float64) if cfg else None
    loss_fn = SCMLoss(sigma_d=SD, teacher=teacher, weighting=weighting, warmup_steps=100, jvp=jvp, backend=backend,
                      guidance=(1.0, 3.0) if cfg else None, uncond_kwargs={"label": None}, passes=passes)
    assert loss_fn.merges(model) == (passes == "merged")
    out = loss_fn(model, x0, step=37, t=t, z=z, model_kwargs={"label": label} if cfg else None,
                  generator=_gen(11))
    assert out.r == 0.37 and int(out.num_dropped) == 0
    params = list(model.parameters()) + list(weighting.parameters())
    out.loss.backward()
    g_ours = _grads(params)
    for p in params:
        p.grad = None
    w = out.guidance
    if cfg:
        assert w.shape == (8,) and float(w.min()) >= 1.0 and float(w.max()) <= 3.0
    ref = algorithm1_float64(model, weighting, x0, z, t, r=0.37, c=0.1, teacher=teacher, w=w, label=label)
    ref.backward()
    g_ref = _grads(params)
    # scm_loss returns a float32 loss on every backend; the reference backend computes in float64, the
    # fused kernels in float32
    tol_value, tol_grad = (2e-7, 1e-12) if backend == "reference" else (5e-7, 5e-7)
    assert abs(out.loss.item() - ref.item()) <= tol_value * abs(ref.item())
    assert _rel(g_ours, g_ref) <= tol_grad


def test_per_sample_outputs():
    """per_sample is the (B,) loss whose mean is `loss`; F_minus is the model's value at (x_t / sigma_d, t);
    J = cos t sin t dF/dt (A13)."""
    torch.manual_seed(0)
    model = ToyMLP(3, 16, 8, embed="reference64", dtype=torch.float64)
    x0, z, t = _case()
    out = SCMLoss(sigma_d=SD, warmup_steps=0, backend="reference")(model, x0, t=t, z=z)
    assert out.per_sample.shape == (6,) and torch.allclose(out.per_sample.mean(), out.loss.detach())
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    with torch.no_grad():
        assert torch.allclose(out.F_minus, model(x_t / SD, t), atol=1e-14)
    h = 1e-5  # dF/dt along the path by a central difference

    def F_on_path(s):
        return model((torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * z) / SD, s)

    with torch.no_grad():
        dFdt = (F_on_path(t + h) - F_on_path(t - h)) / (2 * h)
    cs = (torch.cos(t) * torch.sin(t))[:, None]
    assert torch.allclose(out.jvp_out, cs * dFdt, atol=1e-8, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# The sCM gradient is the dt -> 0 limit of the discrete consistency-loss gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sct", "scd"])
def test_gradient_is_limit_of_discrete_consistency_gradient(variant):
    """With r = 1, no normalization and no adaptive weight (algorithm.md sec. 7):
    grad sum_b ||F - F^- - g||^2 = lim (1/dt) (1/(sigma_d tan t)) grad sum_b ||f_theta(x_t, t) - f_theta^-(x_{t-dt}, t-dt)||^2,
    x_{t-dt} on the same path (sCT: same x0, z; sCD: the teacher's DDIM move A7). Finite dt in float64: the
    relative error halves when dt halves."""
    torch.manual_seed(1)
    model = ToyMLP(3, 24, 8, embed="reference64", dtype=torch.float64)
    teacher = ToyMLP(3, 16, 8, embed="reference64", dtype=torch.float64) if variant == "scd" else None
    B, D = 8, 3
    x0, z, t = _case(B, D, seed=3)
    t = 0.2 + 1.1 * (t - 0.05) / 1.45  # away from 0 and pi/2: tan t finite, t - dt > 0
    params = list(model.parameters())
    out = SCMLoss(sigma_d=SD, teacher=teacher, weighting=None, warmup_steps=0, tangent_norm_c=None)(model, x0, t=t, z=z)
    (out.loss * B * D).backward()
    g_scm = _grads(params)
    ct, st = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = ct * x0 + st * z

    def f(x, s, grad):
        with torch.set_grad_enabled(grad):
            return torch.cos(s)[:, None] * x - torch.sin(s)[:, None] * SD * model(x / SD, s)

    errs = []
    for dt in (8e-3, 4e-3, 2e-3, 1e-3):
        s = t - dt
        if teacher is None:
            x_s = torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * z
        else:
            with torch.no_grad():
                x_s = math.cos(dt) * x_t - math.sin(dt) * SD * teacher(x_t / SD, t)  # (A7)
        for p in params:
            p.grad = None
        diff = f(x_t, t, True) - f(x_s, s, False).detach()
        ((diff**2).sum(1) / (dt * SD * torch.tan(t))).sum().backward()
        errs.append(_rel(_grads(params), g_scm))
    for a, b in itertools.pairwise(errs):
        assert 1.7 < a / b < 2.3, errs
    assert errs[-1] < 2e-2, errs


# ---------------------------------------------------------------------------------------------
# Dropout, the two JVP paths, A18
# ---------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Keeps the output of the last call made with grad enabled (the gradient pass)."""

    def __init__(self, m):
        super().__init__()
        self.m = m
        self.last = None

    def forward(self, x, t, **kw):
        out = self.m(x, t, **kw)
        if torch.is_grad_enabled():
            self.last = out.detach().clone()
        return out


class LayerRecorder(Recorder):
    def forward_jvp(self, *args, **kw):
        return self.m.forward_jvp(*args, **kw)


class TorchDropoutNet(nn.Module):
    """A model with torch's own nn.Dropout (func path only)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.SiLU(), nn.Dropout(0.5), nn.Linear(64, 3))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


@pytest.mark.parametrize("net", ["toy_func", "toy_layer", "torch_dropout"])
def test_dropout_masks_identical_in_both_passes(net):
    """F^- (the primal of the JVP pass) equals the gradient pass's F bitwise with dropout p = 0.5: both
    passes drew the same masks. Control: two plain calls differ, so the masks are really random."""
    torch.manual_seed(0)
    if net == "torch_dropout":
        m, jvp = Recorder(TorchDropoutNet()), "func"
    else:
        m, jvp = LayerRecorder(ToyMLP(3, 32, 8, p=0.5)), net.split("_")[1]
    x0, z, t = _case(16, 3, dtype=torch.float32)
    out = SCMLoss(sigma_d=SD, warmup_steps=0, jvp=jvp)(m, x0, t=t, z=z)
    assert torch.equal(m.last, out.F_minus)
    with torch.no_grad():
        a, b = m(x0, t), m(x0, t)
    assert not torch.equal(a, b)


def test_func_and_layer_paths_agree():
    """The whole-model torch.func.jvp and the per-layer forward_jvp give the same loss, F^-, J and
    gradients (float32, dropout on, time embedding through the fused op)."""
    torch.manual_seed(0)
    model = ToyMLP(3, 32, 16, p=0.2, time_scale=5.0)
    x0, z, t = _case(32, 3, dtype=torch.float32)
    res = {}
    for jvp in ("func", "layer"):
        loss_fn = SCMLoss(sigma_d=SD, warmup_steps=0, jvp=jvp)
        torch.manual_seed(7)
        out = loss_fn(model, x0, t=t, z=z)
        out.loss.backward()
        res[jvp] = (out, _grads(model.parameters()))
        model.zero_grad()
    (a, ga), (b, gb) = res["func"], res["layer"]
    assert torch.allclose(a.F_minus, b.F_minus, atol=1e-6) and torch.allclose(a.jvp_out, b.jvp_out, atol=1e-5, rtol=1e-5)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5 * abs(a.loss.item())
    assert _rel(ga, gb) < 1e-4
    with pytest.raises(TypeError, match="forward_jvp"):
        model_jvp(TorchDropoutNet(), x0, t, x0, t, mode="layer")


def test_merged_passes_rules_and_errors():
    """passes="auto" merges only for a model that declares forward_jvp_differentiable, on the per-layer
    path, with grad enabled and no other jvp_model (DDP); "merged" with another jvp_model and unknown
    values are errors. (FSDP-sharded models: tests/scm/test_fsdp.py.)"""
    toy = ToyMLP(3, 8, 4)

    class Declared(ToyMLP):
        forward_jvp_differentiable = True

    net = Declared(3, 8, 4)
    auto = SCMLoss()
    assert auto.merges(net) and not auto.merges(toy)
    assert not SCMLoss(jvp="func").merges(net) and not SCMLoss(passes="separate").merges(net)
    assert auto.merges(net, jvp_model=net) and not auto.merges(net, jvp_model=toy)
    assert SCMLoss(passes="merged").merges(toy) and SCMLoss(passes="merged", jvp="func").merges(toy)
    assert SCMLoss(passes="merged").merges(toy, jvp_model=toy)
    with torch.no_grad():
        assert not auto.merges(net)
    assert not auto.merges(torch.compile(net))  # the gradient pass stays in the compiled forward
    with pytest.raises(ValueError, match="passes='merged' takes the gradient pass"):
        SCMLoss(passes="merged", warmup_steps=0)(toy, torch.randn(4, 3), jvp_model=Declared(3, 8, 4))
    with pytest.raises(ValueError, match="passes must be one of"):
        SCMLoss(passes="fused")


@pytest.mark.parametrize("jvp", ["func", "layer"])
def test_merged_passes_keep_dropout_masks_and_rng(jvp):
    """With dropout p = 0.5, merged passes give the separate passes' loss, F^-, J and gradients, and
    leave the RNG where the separate passes leave it (advanced by one pass), also with A18's extra
    passes."""
    for semi in (False, True):
        res = {}
        for mode in ("separate", "merged"):
            torch.manual_seed(0)
            model = ToyMLP(3, 32, 8, p=0.5)
            x0, z, t = _case(16, 3, dtype=torch.float32)
            loss_fn = SCMLoss(sigma_d=SD, warmup_steps=0, jvp=jvp, passes=mode, semi_continuous=semi)
            out = loss_fn(model, x0, t=t, z=z)
            out.loss.backward()
            res[mode] = (out, _grads(model.parameters()), torch.get_rng_state())
        (a, ga, ra), (b, gb, rb) = res["separate"], res["merged"]
        assert torch.equal(ra, rb)
        assert torch.equal(a.F_minus, b.F_minus)
        assert torch.allclose(a.jvp_out, b.jvp_out, rtol=1e-6, atol=1e-7)
        assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * abs(a.loss.item())
        assert _rel(ga, gb) <= 1e-5


@pytest.mark.parametrize("jvp", ["func", "layer"])
def test_semi_continuous_time_derivative(jvp):
    """(A18): exact JVP in x plus a central difference in t matches the full JVP: to ~1e-7 in float64
    (step 1e-4, error O(h^2)), to ~1e-2 in float32 (rounding / h)."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 1e-2)):
        embed = "reference64" if dtype == torch.float64 else "fused"
        model = ToyMLP(3, 24, 8, embed=embed, time_scale=2.0, dtype=dtype)
        x0, z, t = _case(8, 3, dtype=dtype)
        exact = SCMLoss(sigma_d=SD, warmup_steps=0, jvp=jvp)(model, x0, t=t, z=z)
        semi = SCMLoss(sigma_d=SD, warmup_steps=0, jvp=jvp, semi_continuous=True)(model, x0, t=t, z=z)
        J, Js = exact.jvp_out, semi.jvp_out
        assert float((J - Js).abs().max()) <= tol * float(J.abs().max()), dtype
        assert torch.equal(exact.F_minus, semi.F_minus)


def test_tangent_warmup_and_step():
    """r = min(1, step / H) (A15); a missing step is an error while warmup is on."""
    loss_fn = SCMLoss(warmup_steps=200)
    assert [loss_fn.warmup(s) for s in (0, 50, 200, 10**6)] == [0.0, 0.25, 1.0, 1.0]
    assert SCMLoss(warmup_steps=0).warmup(None) == 1.0
    model = ToyMLP(3, 8, 4)
    x0 = torch.randn(4, 3)
    with pytest.raises(ValueError, match="pass step="):
        loss_fn(model, x0)


# ---------------------------------------------------------------------------------------------
# Non-finite samples
# ---------------------------------------------------------------------------------------------
class BadTangents(nn.Module):
    """A model whose JVP overflows (inf) for chosen samples, and an sCD teacher that returns NaN for others."""

    def __init__(self, m, bad_jvp):
        super().__init__()
        self.m, self.bad_jvp = m, bad_jvp

    def forward(self, x, t):
        return self.m(x, t)

    def forward_jvp(self, x, t, x_dot, t_dot):
        F, Fd = self.m.forward_jvp(x, t, x_dot, t_dot)
        Fd = Fd.clone()
        Fd[self.bad_jvp] = float("inf")
        return F, Fd


def test_nonfinite_samples_are_dropped_and_counted():
    torch.manual_seed(0)
    inner = ToyMLP(3, 16, 8)
    teacher_inner = ToyMLP(3, 16, 8)

    def teacher(x, t):
        F = teacher_inner(x, t).clone()
        F[2] = float("nan")
        return F

    model = BadTangents(inner, [1, 4])
    x0, z, t = _case(8, 3, dtype=torch.float32)
    keep = torch.tensor([0, 3, 5, 6, 7])
    loss_fn = SCMLoss(sigma_d=SD, warmup_steps=0, teacher=teacher, weighting=None)
    out = loss_fn(model, x0, t=t, z=z)
    assert int(out.num_dropped) == 3
    assert torch.isnan(out.per_sample[[1, 2, 4]]).all() and torch.isfinite(out.per_sample[keep]).all()
    out.loss.backward()
    g = _grads(inner.parameters())
    assert all(torch.isfinite(x).all() for x in g)
    inner.zero_grad()
    sub = SCMLoss(sigma_d=SD, warmup_steps=0, teacher=teacher_inner, weighting=None)(inner, x0[keep], t=t[keep], z=z[keep])
    sub.loss.backward()
    assert abs(out.loss.item() - sub.loss.item()) < 1e-6 * sub.loss.item()
    assert _rel(g, _grads(inner.parameters())) < 1e-5
    with pytest.raises(RuntimeError, match="3 of 8 samples"):
        SCMLoss(sigma_d=SD, warmup_steps=0, teacher=teacher, nonfinite="raise")(model, x0, t=t, z=z)
    ign = SCMLoss(sigma_d=SD, warmup_steps=0, teacher=teacher, nonfinite="ignore")(model, x0, t=t, z=z)
    assert not torch.isfinite(ign.loss)


# ---------------------------------------------------------------------------------------------
# Mixed precision, the diffusion loss, options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jvp", ["func", "layer"])
def test_autocast_keeps_time_side_in_fp32(jvp):
    """Under CPU bf16 autocast: times, their tangent and logvar stay float32 (the weighting's embedding is
    fp32 and unaffected by autocast), and the loss is close to the fp32 one."""
    torch.manual_seed(0)
    model = ToyMLP(3, 32, 16)
    weighting = AdaptiveWeighting(dim=32, hidden=16)
    _perturb(weighting, 2)
    x0, z, t = _case(16, 3, dtype=torch.float32)
    loss_fn = SCMLoss(sigma_d=SD, warmup_steps=0, weighting=weighting, jvp=jvp)
    ref = loss_fn(model, x0, t=t, z=z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(model, x0, t=t, z=z)
        lv = weighting(t)
    assert out.t.dtype == torch.float32 and out.logvar.dtype == torch.float32 and lv.dtype == torch.float32
    assert torch.equal(lv, weighting(t))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.loss.item()) < 0.05 * abs(ref.loss.item()) + 0.05
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in weighting.parameters())


def test_diffusion_loss_is_minimized_by_the_exact_F():
    """(A4): for Gaussian data the exact F = E[v_t | x_t] / sigma_d minimizes the diffusion loss: over the
    family a F, the empirical optimum a* = <sigma_d F, v> / ||sigma_d F||^2 is 1 (Monte Carlo, 200k samples);
    per-sample value = ||sigma_d F - v_t||^2 / (sigma_d^2 D) without weighting."""
    s = 0.8
    n = 200_000
    x0 = torch.randn(n, 1, generator=_gen(1), dtype=torch.float64) * s
    z = torch.randn(n, 1, generator=_gen(2), dtype=torch.float64) * SD
    t = TimeProposal(-0.8, 1.6).sample(n, SD, generator=_gen(3), dtype=torch.float64)
    vals = {}
    for a in (0.9, 1.0, 1.1):
        scaled = lambda x, tt, a=a: a * gauss_teacher_F(x, tt, s, SD)
        out = TrigFlowDiffusionLoss(sigma_d=SD, weighting=None)(scaled, x0, t=t, z=z)
        vals[a] = out.loss.item()
    # the loss is quadratic in a: its minimizer from three points
    a_star = 1.0 - 0.1 * (vals[1.1] - vals[0.9]) / (2 * (vals[1.1] - 2 * vals[1.0] + vals[0.9]))
    assert abs(a_star - 1) < 0.01, (a_star, vals)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    v = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0
    F = gauss_teacher_F(x_t / SD, t, s, SD)
    assert math.isclose(vals[1.0], float(((SD * F - v) ** 2).mean() / SD**2), rel_tol=1e-12)
    # adaptive weighting: L = exp(-logvar) mse + logvar, logvar = w_phi(t) (A17's form on the A4 loss)
    w = AdaptiveWeighting(dim=8, hidden=0).double()
    _perturb(w, 3)
    out = TrigFlowDiffusionLoss(sigma_d=SD, weighting=w)(lambda x, tt: gauss_teacher_F(x, tt, s, SD), x0[:64],
                                                         t=t[:64], z=z[:64])
    mse = ((SD * F[:64] - v[:64]) ** 2).sum(1) / SD**2
    assert out.logvar.shape == (64,) and float(out.logvar.detach().abs().min()) > 0
    assert torch.allclose(out.per_sample, torch.exp(-out.logvar) * mse + out.logvar, rtol=1e-12, atol=1e-12)


def test_options_and_errors():
    with pytest.raises(ValueError, match="jvp"):
        SCMLoss(jvp="forward")
    with pytest.raises(ValueError, match="nonfinite"):
        SCMLoss(nonfinite="skip")
    with pytest.raises(ValueError, match="needs a teacher"):
        SCMLoss(guidance=2.0)
    with pytest.raises(ValueError, match="tangent_norm_c"):
        SCMLoss(tangent_norm_c=0.0)
    with pytest.raises(ValueError, match="unknown preset"):
        SCMLoss(proposal="mnist")
    teacher = ToyMLP(3, 8, 4)
    loss_fn = SCMLoss(teacher=teacher, proposal=(-0.5, 1.0))
    assert loss_fn.proposal == TimeProposal(-0.5, 1.0)
    assert not any(k.startswith("teacher") for k in loss_fn.state_dict())  # w_phi only
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in loss_fn.weighting.parameters()}


# ---------------------------------------------------------------------------------------------
# Training from scratch on closed-form data
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """The training tests use tiny matrices: one thread is fastest, and avoids OpenMP threads spinning
    against each other on a shared, busy machine (which made these tests 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(model, loss_fn, sample_x0, steps, lr, gen):
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for i in range(steps):
        out = loss_fn(model, sample_x0(gen), step=i, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return out


def test_sct_learns_the_gaussian_consistency_function(one_thread):
    """1-D data N(0, s^2): the true consistency function is f(x_t, t) = s x_t / sqrt(cos^2 t s^2 + sin^2 t sigma_d^2)
    (algorithm.md sec. 7). A small MLP trained by sCT from scratch (1500 steps of batch 1024, Adam with a
    linear decay) learns its slope within 5% at t in {0.3, 0.8, 1.2, 1.5}, and its 1- and 2-step samples
    have the data's std within 5% (200k samples)."""
    s = 1.0
    torch.manual_seed(0)
    model = ToyMLP(dim=1, hidden=64, emb_dim=16)
    loss_fn = SCMLoss(sigma_d=SD, proposal="cifar10", warmup_steps=100,
                      weighting=AdaptiveWeighting(dim=32, hidden=32, time_scale=10.0))
    t0 = time.perf_counter()
    _train(model, loss_fn, lambda g: torch.randn(1024, 1, generator=g) * s, 1500, 2e-3, _gen(1))
    seconds = time.perf_counter() - t0
    slope_err = {}
    with torch.no_grad():
        for t in (0.3, 0.8, 1.2, 1.5):
            true = float(gauss_slope(t, s, SD))
            x_t = torch.linspace(-2, 2, 201).reshape(-1, 1) * (s / true)  # +-2 std of x_t
            f = math.cos(t) * x_t - math.sin(t) * SD * model(x_t / SD, torch.full((201,), t))
            slope = float((f * x_t).sum() / (x_t * x_t).sum())
            slope_err[t] = slope / true - 1
    z = initial_noise((200_000, 1), SD, generator=_gen(5))
    std1 = float(sample_onestep(model, z, sigma_d=SD, seed=1).std()) / s - 1
    std2 = float(sample_twostep(model, z, sigma_d=SD, seed=2).std()) / s - 1
    print(f"\nsCT 1-D Gaussian: {seconds:.1f} s; slope errors {slope_err}; std errors 1-step {std1:+.4f}, "
          f"2-step {std2:+.4f}")
    assert all(abs(e) < 0.05 for e in slope_err.values()), slope_err
    assert abs(std1) < 0.05 and abs(std2) < 0.05, (std1, std2)


def test_scd_on_a_gaussian_mixture_matches_the_teacher(one_thread):
    """2-D mixture of three Gaussians with the exact teacher F (from the analytic score, toys.MixtureTeacher).
    The student starts at the teacher, as in sCD (here: a short regression of its F onto the teacher's,
    since the teacher has no weights to copy), then 1500 sCD steps of batch 512. The sliced-Wasserstein distance of its
    2-step samples to fresh data is within 3x that of the teacher's 50-step ODE samples (DPM-Solver-2),
    20k samples each. Control: the teacher-initialized student before sCD is far outside that bound."""
    torch.manual_seed(0)
    teacher = MixtureTeacher([[-0.6, -0.3], [0.6, -0.3], [0.0, 0.6]], [0.35] * 3, [0.3, 0.3, 0.4], SD)
    model = ToyMLP(dim=2, hidden=128, emb_dim=16)
    proposal = TimeProposal(-1.0, 1.4)
    gen = _gen(1)
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):  # student := teacher
        t = proposal.sample(512, SD, generator=gen)
        x_t = (torch.cos(t)[:, None] * teacher.sample(512, gen).float()
               + torch.sin(t)[:, None] * SD * torch.randn(512, 2, generator=gen))
        loss = ((model(x_t / SD, t) - teacher(x_t / SD, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    n = 20_000
    data = teacher.sample(n, _gen(11)).float()
    z = initial_noise((n, 2), SD, generator=_gen(5))
    with torch.no_grad():
        sw_init = sliced_wasserstein(sample_twostep(model, z, sigma_d=SD, seed=3), data)
    model.train()
    loss_fn = SCMLoss(sigma_d=SD, teacher=teacher, proposal=proposal, warmup_steps=100,
                      weighting=AdaptiveWeighting(dim=32, hidden=32, time_scale=10.0))
    _train(model, loss_fn, lambda g: teacher.sample(512, g).float(), 1500, 2e-3, gen)
    seconds = time.perf_counter() - t0
    x_student = sample_twostep(model, z, sigma_d=SD, seed=3)
    x_teacher = sample_dpm2(teacher, z.double(), ode_times(50, SD), sigma_d=SD)
    sw_student = sliced_wasserstein(x_student, data)
    sw_teacher = sliced_wasserstein(x_teacher, data)
    sw_floor = sliced_wasserstein(teacher.sample(n, _gen(12)), data)
    print(f"\nsCD 2-D mixture: {seconds:.1f} s; sliced W1 to data: 2-step student {sw_student:.4f}, teacher 50-step "
          f"ODE {sw_teacher:.4f}, fresh data {sw_floor:.4f}, student before sCD {sw_init:.4f}")
    assert sw_teacher < 2 * sw_floor
    assert sw_student <= 3 * sw_teacher
    assert sw_init > 3 * sw_teacher
