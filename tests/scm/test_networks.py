"""Tests of scm.networks (U-Net, DiT): the JVP with fused ops equals the JVP with reference ops (whole
model through torch.func.jvp, and the per-layer forward_jvp path), forward_jvp equals torch.func.jvp
(also with dropout: the same masks), 20 sCT training steps give the same losses with fused and with
reference ops, the time-embedding hook of the CUDA-graph sampler, autocast, presets' parameter
counts on the meta device, argument errors.

Parameters are perturbed away from their zero initialisations (adaLN-Zero, zero output convs), which
would otherwise make most of the network the identity and the comparisons nearly empty."""

from __future__ import annotations

import pytest
import torch

from scm.losses import SCMLoss
from scm.networks import DiT, PRESET_PARAMS, PRESETS, UNet, count_parameters, create, set_backend

pytestmark = pytest.mark.reference


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unet(norm_mode="double", dropout=0.0, **kw):
    cfg = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), head_dim=8,
               num_groups=4, num_classes=3, norm_mode=norm_mode, dropout=dropout)
    return UNet(8, 2, **{**cfg, **kw})


def _dit(**kw):
    return DiT(8, 2, **{**dict(patch_size=2, dim=16, depth=2, num_heads=2, num_classes=3, pos_dim=16), **kw})


def _perturbed(net, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net.to(dtype)


def _inputs(dtype, B=2, C=2, R=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, R, R, generator=g, dtype=torch.float64).to(dtype)
    t = (0.05 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64)).to(dtype)
    x_dot = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    t_dot = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return x, t, x_dot, t_dot, torch.tensor([0, 3])[:B]


def _rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _both_paths(net, backend, x, t, x_dot, t_dot, y):
    net.set_backend(backend)
    F1, J1 = torch.func.jvp(lambda a, b: net(a, b, class_labels=y), (x, t), (x_dot, t_dot))
    with torch.no_grad():
        F2, J2 = net.forward_jvp(x, t, x_dot, t_dot, class_labels=y)
    return F1, J1, F2, J2


NETS = [pytest.param(lambda: _unet("double"), id="unet-double"),
        pytest.param(lambda: _unet("adagn"), id="unet-adagn"),
        pytest.param(_dit, id="dit")]


@pytest.mark.parametrize("make", NETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jvp_fused_equals_reference(make, dtype, kernel_backend):
    name, device = kernel_backend
    if device != "cpu":
        pytest.skip("CPU-tensor test")
    if name == "triton" and dtype == torch.float64:
        pytest.skip("triton takes no float64")
    if name == "triton" and device == "cpu" and getattr(make(), "norm_mode", "double") != "double":
        # ~100 s per U-Net under the interpreter: the "double" U-Net runs the same kernels and more
        pytest.skip("interpreter: the adagn U-Net is covered by the double one")
    net = _perturbed(make(), dtype)
    args = _inputs(dtype)
    ref = _both_paths(net, "reference", *args)
    fused = _both_paths(net, name, *args)
    # float32: 1e-5 relative. float64: the cpu kernels of group_norm / pixel_norm accumulate their
    # statistics in float32 (the project's convention), which bounds the U-Net to ~1e-6; the DiT
    # (attention only) is exact to rounding.
    tol = 1e-5 if dtype == torch.float32 else (1e-11 if isinstance(net, DiT) else 5e-6)
    for what, a, b in zip(("F (func)", "J (func)", "F (layer)", "J (layer)"), fused, ref):
        assert _rel(a, b) <= tol, f"{name} vs reference, {what}: {_rel(a, b):.3e} > {tol:.0e}"
    assert float(ref[1].abs().max()) > 1.0  # a real tangent, not the identity of a zero-initialised net


@pytest.mark.parametrize("make", NETS)
def test_forward_jvp_equals_func_jvp(make):
    net = _perturbed(make(), torch.float64)
    F1, J1, F2, J2 = _both_paths(net, "reference", *_inputs(torch.float64))
    assert _rel(F2, F1) <= 1e-13 and _rel(J2, J1) <= 1e-12
    # and the tangent is the derivative: central difference in float64
    x, t, x_dot, t_dot, y = _inputs(torch.float64)
    h = 1e-7  # time_scale 1000 makes the time embedding oscillate fast: a small step
    with torch.no_grad():
        fd = (net(x + h * x_dot, t + h * t_dot, class_labels=y)
              - net(x - h * x_dot, t - h * t_dot, class_labels=y)) / (2 * h)
    assert _rel(J2, fd) <= 1e-5


def test_forward_jvp_dropout_masks_match():
    """In training mode with dropout, forward_jvp draws the masks forward draws (same RNG state)."""
    net = _perturbed(_unet(dropout=0.3), torch.float64).train()
    x, t, x_dot, t_dot, y = _inputs(torch.float64)
    net.set_backend("reference")
    torch.manual_seed(5)
    F1, J1 = torch.func.jvp(lambda a, b: net(a, b, class_labels=y), (x, t), (x_dot, t_dot))
    torch.manual_seed(5)
    with torch.no_grad():
        F2, J2 = net.forward_jvp(x, t, x_dot, t_dot, class_labels=y)
    torch.manual_seed(5)
    F3 = net(x, t, class_labels=y)
    torch.manual_seed(6)
    F4 = net(x, t, class_labels=y)
    assert _rel(F2, F1) <= 1e-13 and _rel(J2, J1) <= 1e-12 and _rel(F3, F2) <= 1e-13
    assert _rel(F4, F3) > 1e-3  # dropout is really on


def _train(backend, jvp, steps=20):
    torch.manual_seed(0)
    net = _unet("double", dropout=0.1).to(torch.float32)
    loss_fn = SCMLoss(sigma_d=0.5, warmup_steps=10, weighting=False, jvp=jvp)
    set_backend(net, backend)
    set_backend(loss_fn, backend)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 2, 8, 8, generator=g) * 0.5
    y = torch.randint(0, 3, (16,), generator=g)
    losses = []
    for step in range(steps):
        out = loss_fn(net, x0, step=step, model_kwargs={"class_labels": y}, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return torch.tensor(losses, dtype=torch.float64), params


@pytest.mark.cpu
def test_training_fused_equals_reference():
    """20 sCT steps (SCMLoss, Adam, dropout) of the tiny U-Net: fused cpu kernels (both JVP paths)
    and reference ops give the same losses in fp32 within 1e-4 relative."""
    from scm_kernels import backend as _backend

    if not _backend.extension_available():
        pytest.skip("scm_kernels._C not built")
    ref_losses, ref_params = _train("reference", "func")
    assert not torch.allclose(ref_losses[:5], ref_losses[-5:])  # it trains: the losses move
    for jvp in ("func", "layer"):
        losses, params = _train("cpu", jvp)
        rel = ((losses - ref_losses).abs() / ref_losses.abs()).max().item()
        assert rel <= 1e-4, f"jvp={jvp}: losses differ by {rel:.2e} relative"
        assert _rel(params, ref_params) <= 1e-4


@pytest.mark.parametrize("make", [pytest.param(lambda: _unet("double", dropout=0.3), id="unet-dropout"),
                                  pytest.param(_dit, id="dit")])
@pytest.mark.parametrize("backend", ["reference", None])
def test_merged_passes_equal_separate_passes(make, backend):
    """SCMLoss's merged passes (the per-layer JVP pass with grad enabled is the gradient pass) on the
    U-Net (dropout on) and the DiT: the separate passes' loss, F^-, J and gradients, with one forward of
    the network instead of two (every Conv2d / Linear called once), and a tangent without autograd."""
    from torch import nn

    res = {}
    for passes in ("separate", "merged"):
        torch.manual_seed(0)
        net = _perturbed(make(), torch.float32).train()
        net.set_backend(backend)
        x, t, _, _, y = _inputs(torch.float32, B=2)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        loss_fn = SCMLoss(sigma_d=0.5, warmup_steps=0, passes=passes, backend=backend)
        assert loss_fn.merges(net) == (passes == "merged")
        calls = []
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in net.modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear))]
        out = loss_fn(net, x, t=t.float().clamp(max=1.5), z=z, model_kwargs={"class_labels": y})
        for h in hooks:
            h.remove()
        out.loss.backward()
        assert not out.jvp_out.requires_grad
        res[passes] = (out, [p.grad.clone() for p in net.parameters()], len(calls), len(hooks))
    (a, ga, na, nh), (b, gb, nb, _) = res["separate"], res["merged"]
    assert nb == na // 2 and nb >= nh
    assert torch.equal(a.F_minus, b.F_minus)  # the same primal operations, so bitwise
    assert _rel(b.jvp_out, a.jvp_out) <= 1e-5  # the tangent's ops may round differently under grad
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * abs(a.loss.item())
    assert max(_rel(u, v) for u, v in zip(gb, ga) if v.abs().max() > 0) <= 1e-4


@pytest.mark.parametrize("backend", ["reference", None])
def test_channels_last_unet_equals_nchw(backend):
    """UNet(channels_last=True) with the same weights gives the NCHW network's F, JVP and sCT
    gradients (up to the rounding of convolutions in another layout); with the fused ops every
    convolution reads a channels-last map (no layout flips inside: up- and down-sampling, skips,
    attention keep it); the outputs come back contiguous."""
    from torch import nn

    torch.manual_seed(0)
    nets = {}
    for cl in (False, True):
        torch.manual_seed(0)
        nets[cl] = _perturbed(_unet("double", channels_last=cl), torch.float32).train()
        nets[cl].set_backend(backend)
    nets[True].load_state_dict(nets[False].state_dict())
    conv_w = [m.weight for m in nets[True].modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_w)
    x, t, x_dot, t_dot, y = _inputs(torch.float32, B=2)
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda m, a: layouts.append(a[0].is_contiguous(
        memory_format=torch.channels_last))) for m in nets[True].modules() if isinstance(m, nn.Conv2d)]
    res = {}
    for cl, net in nets.items():
        F = net(x, t, class_labels=y)
        with torch.no_grad():
            F2, J = net.forward_jvp(x, t, x_dot, t_dot, class_labels=y)
        loss_fn = SCMLoss(sigma_d=0.5, warmup_steps=0)
        out = loss_fn(net, x, t=t.clamp(max=1.5), z=x_dot, model_kwargs={"class_labels": y})
        out.loss.backward()
        assert F.is_contiguous() and J.is_contiguous()
        res[cl] = (F, F2, J, out.loss, [p.grad for p in net.parameters()])
    for h in hooks:
        h.remove()
    # the fused ops keep the layout; the reference group_norm goes through a contiguous copy (torch 2.13's
    # torch.func.jvp of F.group_norm fails on channels-last tensors), so convolutions see NCHW maps there
    assert layouts and (all(layouts) if backend is None else layouts[0])
    (F, F2, J, L, g), (Fc, F2c, Jc, Lc, gc) = res[False], res[True]
    assert _rel(Fc, F) <= 1e-5 and _rel(F2c, F2) <= 1e-5 and _rel(Jc, J) <= 1e-5
    assert abs(Lc.item() - L.item()) <= 1e-5 * abs(L.item())
    assert max(_rel(a, b) for a, b in zip(gc, g) if b.abs().max() > 0) <= 1e-3
    with pytest.raises(ValueError, match="channels_last must be a bool"):
        _unet(channels_last="yes")


def test_time_emb_hook_and_guidance():
    net = _perturbed(_unet(guidance_input=True), torch.float64)
    x, t, *_ = _inputs(torch.float64)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        a = net(x, t, class_labels=torch.tensor([1, 2]), guidance=w)
        b = net(x, t, class_labels=torch.tensor([1, 2]), guidance=w, **net.embed_time(t))
        c = net(x, t, class_labels=torch.tensor([1, 2]), guidance=w + 1)
        d = net(x, t, class_labels=None, guidance=w)  # null label
    assert _rel(b, a) <= 1e-14
    assert _rel(c, a) > 1e-4 and _rel(d, a) > 1e-4
    with pytest.raises(ValueError, match="guidance"):
        net(x, t, class_labels=torch.tensor([1, 2]))


@pytest.mark.parametrize("make", NETS)
def test_samplers_with_time_hook(make):
    """The networks run in scm.sampling; the sampler-graph time hook (embed_time) changes nothing."""
    from scm.sampling import ConsistencySamplerGraph, sample_twostep

    net = _perturbed(make(), torch.float32).eval()
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    kw = {"class_labels": torch.tensor([0, 1])}
    plain = ConsistencySamplerGraph(net, noise, times=[1.5, 0.0], model_kwargs=kw, enabled=False)
    hooked = ConsistencySamplerGraph(net, noise, times=[1.5, 0.0], model_kwargs=kw,
                                     time_kwargs=net.embed_time, enabled=False)
    x_plain, x_hooked = plain(noise), hooked(noise)
    assert torch.isfinite(x_plain).all() and _rel(x_hooked, x_plain) <= 1e-6
    x2 = sample_twostep(net, noise, seed=0, model_kwargs=kw)
    assert x2.shape == noise.shape and torch.isfinite(x2).all()


@pytest.mark.parametrize("make", NETS)
def test_autocast_bf16(make):
    """Under bf16 autocast the forward and the JVP run, are finite and stay close to fp32."""
    net = _perturbed(make(), torch.float32)
    x, t, x_dot, t_dot, y = _inputs(torch.float32)
    F32, J32 = torch.func.jvp(lambda a, b: net(a, b, class_labels=y), (x, t), (x_dot, t_dot))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F16, J16 = torch.func.jvp(lambda a, b: net(a, b, class_labels=y), (x, t), (x_dot, t_dot))
        with torch.no_grad():
            F16l, J16l = net.forward_jvp(x, t, x_dot, t_dot, class_labels=y)
    assert F16.dtype == torch.float32  # returned in the input's dtype
    for a, b in ((F16, F32), (J16, J32), (F16l, F32), (J16l, J32)):
        assert torch.isfinite(a).all() and _rel(a, b) < 0.1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_meta_param_counts(name):
    net = create(name, device="meta")
    assert next(net.parameters()).device.type == "meta"
    assert count_parameters(net) == PRESET_PARAMS[name]


def test_demo_preset_runs():
    net = create("demo-digits8")
    assert 1e5 < count_parameters(net) < 1e6
    x, t, *_ = _inputs(torch.float32, B=2, C=1, R=8)
    assert net(x, t).shape == x.shape


@pytest.mark.parametrize("kw, match", [
    (dict(norm_mode="layer"), "norm_mode"),
    (dict(num_groups=3), "num_groups"),
    (dict(attn_resolutions=(5,)), "attn_resolution"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(head_dim=6), "head_dim"),
    (dict(dropout=1.5), "dropout"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(backend="fast"), "backend"),
])
def test_unet_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _unet(**kw)


def test_bad_inputs_and_dit_config():
    with pytest.raises(ValueError, match="img_resolution"):
        UNet(12, 1, channel_mult=(1, 2, 2, 2), model_channels=8, num_groups=4, head_dim=8,
             attn_resolutions=())
    with pytest.raises(ValueError, match="patch_size"):
        _dit(patch_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        _dit(num_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        create("cifar11")
    net = _unet()
    with pytest.raises(ValueError, match="x must be"):
        net(torch.zeros(2, 2, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.zeros(2, 2, 8, 8), torch.zeros(2), class_labels=torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# Linear / Conv2d with the input-only forward-mode rule, nearest upsampling
# ---------------------------------------------------------------------------------------------
def _layer_pair(kind):
    """(ours, torch's) with the same float64 parameters, and an input."""
    from scm.networks.layers import Conv2d, Linear
    torch.manual_seed(0)
    if kind == "linear":
        ours, ref, x = Linear(6, 5), torch.nn.Linear(6, 5), torch.randn(3, 4, 6)
    else:
        ours, ref = Conv2d(4, 5, 3, padding=1, stride=2), torch.nn.Conv2d(4, 5, 3, padding=1, stride=2)
        x = torch.randn(2, 4, 7, 9)
    ours, ref, x = ours.double(), ref.double(), x.double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_input_jvp_matches_torch_and_skips_weight_tangent(kind):
    ours, ref, x = _layer_pair(kind)
    xd = torch.randn_like(x)
    with torch.profiler.profile() as prof:
        y, yd = torch.func.jvp(ours, (x,), (xd,))
    y2, yd2 = torch.func.jvp(ref, (x,), (xd,))
    assert torch.allclose(y, y2, rtol=1e-12, atol=1e-12) and torch.allclose(yd, yd2, rtol=1e-12, atol=1e-12)
    # primal + tangent: two products, not the third one with the weight's zero tangent
    n = sum(e.count for e in prof.key_averages() if e.key in ("aten::mkldnn_convolution", "aten::addmm",
                                                                "aten::mm", "aten::bmm", "aten::thnn_conv2d"))
    assert n == 2, [(e.key, e.count) for e in prof.key_averages()]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_jvp_wrt_parameters_and_reverse_through_tangent(kind):
    """Tangents on the parameters take PyTorch's full rule; a loss on the tangent differentiates to the
    weight exactly as through nn.Linear / nn.Conv2d."""
    ours, ref, x = _layer_pair(kind)
    xd = torch.randn_like(x)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    tans = {k: torch.randn_like(v) for k, v in params.items()}
    f = lambda m: lambda p, a: torch.func.functional_call(m, p, (a,))  # noqa: E731
    out = torch.func.jvp(f(ours), (params, x), (tans, xd))
    out2 = torch.func.jvp(f(ref), (params, x), (tans, xd))
    for a, b in zip(out, out2):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    grads = []
    for m in (ours, ref):
        _, yd = torch.func.jvp(m, (x,), (xd,))
        grads.append(torch.autograd.grad(yd.square().sum() + m(x).sum(), m.weight)[0])
    assert torch.allclose(*grads, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest_upsample_equals_interpolate(channels_last):
    from scm.networks.layers import _resample
    x = torch.randn(2, 3, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y, y2 = _resample(x, "up"), torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    assert torch.equal(y, y2) and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(y)
    ga, gb = (torch.autograd.grad(a, x, g)[0] for a in (y, y2))
    assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-6)  # sums of 4 values, in another order
    d = torch.randn_like(x)
    assert torch.equal(torch.func.jvp(lambda a: _resample(a, "up"), (x.detach(),), (d,))[1], _resample(d, "up"))


@pytest.mark.parametrize("preset", ["demo-digits8", "demo-dit"])
def test_forward_jvp_runs_two_products_per_layer(preset):
    """The JVP pass of a whole network (A13) costs two convolutions per Conv2d (primal and tangent),
    not PyTorch's three: a regression guard for the Linear / Conv2d of scm.networks.layers."""
    from scm.networks.layers import Conv2d
    net = create(preset).eval()
    n_conv = sum(isinstance(m, Conv2d) for m in net.modules())
    C, R = net.in_channels, net.img_resolution
    x, xd = torch.randn(2, C, R, R), torch.randn(2, C, R, R)
    t, td = torch.rand(2), torch.rand(2)
    with torch.no_grad(), torch.profiler.profile() as prof:
        net.forward_jvp(x, t, xd, td)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_convolution")
    assert n_conv > 0 and calls == 2 * n_conv, (calls, n_conv)
