"""Networks F_theta(x, t) of TrigFlow consistency models: an EDM/ADM-style U-Net and a DiT.

Both follow the model protocol of scm.losses (F = model(x_t / sigma_d, t, class_labels=...,
guidance=...), t = c_noise(t) of shape (B,)), are forward-mode differentiable through every layer
(torch.func.jvp over the whole model), and offer the per-layer JVP path ``forward_jvp(x, t, x_dot,
t_dot, **kw) -> (F, F_dot)`` (A13) with attention through scm_kernels.attention_jvp (A24-A25).
``backend=`` / ``set_backend()`` route every fused op (None: automatic; "reference": plain PyTorch).

Presets (``create(name, **overrides)``; parameter counts from instantiating on the meta device,
checked by tests/scm/test_networks.py):

| preset              | net  | input   | configuration                                      | parameters    |
| ------------------- | ---- | ------- | -------------------------------------------------- | ------------- |
| demo-digits8        | UNet | 1x8x8   | ch 24, mult (1,2), 1 block, attn @4, double norm   |       421,129 |
| demo-16             | UNet | 1x16x16 | ch 24, mult (1,2,2), 1 block, attn @8, 10 classes  |       704,953 |
| demo-32             | UNet | 3x32x32 | ch 24, mult (1,2,2), 1 block, attn @8, 10 classes  |       705,819 |
| demo-dit            | DiT  | 1x16x16 | p 2, dim 64, depth 4, 4 heads                      |       315,972 |
| cifar10-ddpmpp      | UNet | 3x32x32 | ch 128, mult (2,2,2), 4 blocks, attn@16, drop .13  |    60,858,115 |
| cifar10-ncsnpp-deep | UNet | 3x32x32 | ch 128, mult (2,2,2), 8 blocks, attn @16, double   |   106,279,683 |
| imagenet64-s        | UNet | 3x64x64 | ch 192, mult (1,2,3,4), 3 blocks, attn@16,8, 1000c |   291,755,139 |
| imagenet64-m        | UNet | 3x64x64 | ch 256, same                                       |   518,227,459 |
| imagenet64-l        | UNet | 3x64x64 | ch 320, same                                       |   809,310,083 |
| imagenet64-xl       | UNet | 3x64x64 | ch 384, same                                       | 1,165,003,011 |
| dit-s2 / b2/ l2/xl2 | DiT  | 4x32x32 | ImageNet-256 latents, p 2, 1000 classes (S/B/L/XL) | see below     |

DiT presets: dit-s2 32.9 M, dit-b2 130.3 M, dit-l2 457.8 M, dit-xl2 674.8 M (DiT-XL/2 of Peebles & Xie has
675 M with 8 output channels).

The CIFAR-10 presets take the widths of EDM's DDPM++ / NCSN++ (sCM's CIFAR-10 model) with this
module's ADM-style blocks, and the ImageNet 64 ones the widths of EDM2's S/M/L/XL (sCM's ImageNet 64
models) with the double normalization, 1000 classes and dropout; the counts therefore differ from
those papers' (their blocks differ), they are the counts of these networks.
"""

from __future__ import annotations

import torch
from torch import nn

from scm.networks.dit import DiT, DiTBlock
from scm.networks.layers import AttentionBlock, ConditionEmbedding, ResBlock, set_backend
from scm.networks.unet import UNet

__all__ = [
    "PRESETS", "PRESET_PARAMS", "AttentionBlock", "ConditionEmbedding", "DiT", "DiTBlock", "ResBlock", "UNet",
    "count_parameters", "create", "set_backend",
]

_IMNET64 = dict(img_resolution=64, in_channels=3, channel_mult=(1, 2, 3, 4), num_blocks=3,
                attn_resolutions=(16, 8), head_dim=64, num_classes=1000, dropout=0.1, norm_mode="double")
_DIT = dict(img_resolution=32, in_channels=4, patch_size=2, num_classes=1000)

_DEMO = dict(model_channels=24, num_blocks=1, head_dim=24, num_groups=8, emb_mult=2)
_CIFAR = dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
              attn_resolutions=(16,), num_heads=1, head_dim=None)

PRESETS: dict[str, tuple[type, dict]] = {
    "demo-digits8": (UNet, dict(img_resolution=8, in_channels=1, channel_mult=(1, 2), attn_resolutions=(4,),
                                norm_mode="double", **_DEMO)),
    "demo-16": (UNet, dict(img_resolution=16, in_channels=1, channel_mult=(1, 2, 2), attn_resolutions=(8,),
                           num_classes=10, **_DEMO)),
    "demo-32": (UNet, dict(img_resolution=32, in_channels=3, channel_mult=(1, 2, 2), attn_resolutions=(8,),
                           num_classes=10, **_DEMO)),
    "demo-dit": (DiT, dict(img_resolution=16, in_channels=1, patch_size=2, dim=64, depth=4, num_heads=4,
                           pos_dim=64)),
    "cifar10-ddpmpp": (UNet, dict(num_blocks=4, dropout=0.13, **_CIFAR)),
    "cifar10-ncsnpp-deep": (UNet, dict(num_blocks=8, dropout=0.2, norm_mode="double", **_CIFAR)),
    "imagenet64-s": (UNet, dict(model_channels=192, **_IMNET64)),
    "imagenet64-m": (UNet, dict(model_channels=256, **_IMNET64)),
    "imagenet64-l": (UNet, dict(model_channels=320, **_IMNET64)),
    "imagenet64-xl": (UNet, dict(model_channels=384, **_IMNET64)),
    "dit-s2": (DiT, dict(dim=384, depth=12, num_heads=6, **_DIT)),
    "dit-b2": (DiT, dict(dim=768, depth=12, num_heads=12, **_DIT)),
    "dit-l2": (DiT, dict(dim=1024, depth=24, num_heads=16, **_DIT)),
    "dit-xl2": (DiT, dict(dim=1152, depth=28, num_heads=16, **_DIT)),
}

# Parameter counts of the presets with their default arguments, from instantiating them on the meta
# device (count_parameters(create(name, device="meta"))); tests/scm/test_networks.py re-counts them.
PRESET_PARAMS: dict[str, int] = {
    "demo-digits8": 421129,
    "demo-16": 704953,
    "demo-32": 705819,
    "demo-dit": 315972,
    "cifar10-ddpmpp": 60858115,
    "cifar10-ncsnpp-deep": 106279683,
    "imagenet64-s": 291755139,
    "imagenet64-m": 518227459,
    "imagenet64-l": 809310083,
    "imagenet64-xl": 1165003011,
    "dit-s2": 32858896,
    "dit-b2": 130303504,
    "dit-l2": 457824272,
    "dit-xl2": 674816272,
}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements) of a model; works on the meta device."""
    return sum(p.numel() for p in model.parameters())


def create(name: str, *, device=None, **overrides) -> nn.Module:
    """The network of preset `name` (see PRESETS), with keyword overrides of its configuration.
    device="meta" builds it without allocating memory (parameter counts of the large presets)."""
    if name not in PRESETS:
        raise ValueError(f"scm.networks.create: unknown preset {name!r}; presets: {sorted(PRESETS)}")
    cls, cfg = PRESETS[name]
    if device is None:
        return cls(**{**cfg, **overrides})
    with torch.device(device):
        return cls(**{**cfg, **overrides})
