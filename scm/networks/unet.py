"""U-Net in the EDM/ADM style for TrigFlow consistency models, on the fused ops of scm_kernels.

    emb   = SiLU(MLP(pos(t)) + E[label] (+ MLP_g(pos(guidance))))      pos: A10, float32 always
    h     = conv3x3(x)
    down  : per level, num_blocks ResBlocks (+ AttentionBlock at attn_resolutions), then a
            down-sampling ResBlock (all but the last level); every output is kept as a skip
    middle: ResBlock, AttentionBlock, ResBlock
    up    : per level, num_blocks + 1 ResBlocks on concat(h, skip) (+ attention), then an
            up-sampling ResBlock (all but the top level)
    F     = conv3x3(SiLU(GN(h)))                                        (zero-initialised)

ResBlocks modulate their second norm by the embedding through scm_kernels.nn.AdaptiveGroupNorm,
classic AdaGN or the paper's adaptive double normalization (norm_mode="double", A11); attention runs
on scm_kernels.nn.Attention. The model follows the protocol of scm.losses: F = model(x, t,
class_labels=..., guidance=...) with x = x_t / sigma_d and t = c_noise(t) (B,), and
``forward_jvp(x, t, x_dot, t_dot, **kw) -> (F, F_dot)`` is the per-layer JVP path (A13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from scm.losses import block_jvp
from scm.networks.layers import (AttentionBlock, ConditionEmbedding, Conv2d, GroupNormAct, ResBlock,
                                 check_backend, set_backend)

__all__ = ["UNet"]

OP = "scm.networks.UNet"
NORM_MODES = ("adagn", "double")


def _pos_int(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{OP}: {name} must be an int >= {minimum}, got {v!r}")
    return v


class UNet(nn.Module):
    """ADM/EDM-style U-Net F_theta(x, t) of a TrigFlow consistency model.

    Args:
        img_resolution: H = W of the input, divisible by 2^(len(channel_mult) - 1).
        in_channels, out_channels: image channels (out default in).
        model_channels: base width; level i has model_channels * channel_mult[i] channels.
        channel_mult: width multipliers, one level per entry.
        num_blocks: ResBlocks per level on the way down (num_blocks + 1 on the way up).
        attn_resolutions: resolutions (H of the feature map) with self-attention after each block.
        num_heads / head_dim: of the attention (give one; head_dim wins when both are given).
        dropout: in every ResBlock (the same masks in the JVP and gradient passes: scm.losses forks the RNG).
        num_classes: 0 for unconditional; else class labels (B,) in [0, num_classes], num_classes = null.
        guidance_input: an extra guidance-scale input (sCD students of a CFG teacher).
        norm_mode: "adagn" (y = GN(x)(1 + s) + b) or "double" (adaptive double normalization, A11).
        num_groups: GroupNorm groups (must divide every width).
        emb_mult: embedding width = model_channels * emb_mult.
        time_scale: s of the time embedding (A10); c_noise(t) = t in [0, pi/2], so s = 1000 spreads it.
        skip_scale: residual branch scale (1/sqrt(2) as in EDM, or 1 as in ADM).
        resample_blocks: down/up sample inside ResBlocks (BigGAN/ADM style; the only mode).
        backend: None/"auto" (automatic per device) or a backend name for every fused op; "reference"
            runs the whole network in plain PyTorch (the oracle of the tests). set_backend() changes it.
        channels_last: keep every feature map in channels-last (NHWC) memory: the input is converted
            once, the convolution weights are stored channels-last, and every layer keeps that layout
            (the fused group_norm and attention read it without copies; torch.func.jvp of PyTorch's
            own F.group_norm cannot, which makes the reference ops slower in it). Outputs are returned
            contiguous (NCHW). Measured on this project's 2-core CPU (oneDNN convolutions), sCT step
            of demo-32 at batch 64, fused ops: 909 -> 753 ms (medians of interleaved steps). Same numbers
            up to rounding (tested).
    """

    # forward_jvp's F is differentiable exactly as forward's: SCMLoss may merge its passes (scm.losses)
    forward_jvp_differentiable = True

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, *,
                 model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2), num_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), num_heads: int | None = None,
                 head_dim: int | None = 64, dropout: float = 0.0, num_classes: int = 0,
                 guidance_input: bool = False, norm_mode: str = "adagn", num_groups: int = 32,
                 emb_mult: int = 4, time_scale: float = 1000.0,
                 skip_scale: float = 1 / math.sqrt(2), backend: str | None = None, channels_last: bool = False):
        super().__init__()
        if not isinstance(channels_last, bool):
            raise ValueError(f"{OP}: channels_last must be a bool, got {channels_last!r}")
        backend = check_backend(backend, OP)
        img_resolution = _pos_int(img_resolution, "img_resolution")
        in_channels = _pos_int(in_channels, "in_channels")
        out_channels = in_channels if out_channels is None else _pos_int(out_channels, "out_channels")
        model_channels = _pos_int(model_channels, "model_channels")
        num_blocks = _pos_int(num_blocks, "num_blocks")
        num_groups = _pos_int(num_groups, "num_groups")
        emb_mult = _pos_int(emb_mult, "emb_mult")
        num_classes = _pos_int(num_classes, "num_classes", 0)
        channel_mult = tuple(channel_mult)
        if not channel_mult:
            raise ValueError(f"{OP}: channel_mult must have at least one level, got {channel_mult}")
        for m in channel_mult:
            _pos_int(m, "every channel_mult entry")
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"{OP}: img_resolution {img_resolution} must be divisible by 2^(levels - 1) = "
                             f"{2 ** (len(channel_mult) - 1)} for channel_mult {channel_mult}")
        if norm_mode not in NORM_MODES:
            raise ValueError(f"{OP}: norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"{OP}: dropout must be a number in [0, 1), got {dropout!r}")
        widths = [model_channels * m for m in channel_mult]
        for w in [model_channels] + widths:
            if w % num_groups:
                raise ValueError(f"{OP}: num_groups ({num_groups}) must divide every width, but not {w} "
                                 f"(model_channels {model_channels} x channel_mult {channel_mult})")
        resolutions = [img_resolution >> i for i in range(len(channel_mult))]
        attn_resolutions = tuple(attn_resolutions)
        for r in attn_resolutions:
            if r not in resolutions:
                raise ValueError(f"{OP}: attn_resolution {r} is not one of the U-Net's resolutions "
                                 f"{resolutions}")
        if head_dim is not None:
            head_dim, num_heads = _pos_int(head_dim, "head_dim"), None
            for w, r in zip(widths, resolutions):
                if r in attn_resolutions and w % head_dim:
                    raise ValueError(f"{OP}: head_dim ({head_dim}) must divide the width {w} at attention "
                                     f"resolution {r}")
        elif num_heads is not None:
            num_heads = _pos_int(num_heads, "num_heads")
            for w, r in zip(widths, resolutions):
                if r in attn_resolutions and w % num_heads:
                    raise ValueError(f"{OP}: num_heads ({num_heads}) must divide the width {w} at attention "
                                     f"resolution {r}")
        else:
            raise ValueError(f"{OP}: give num_heads or head_dim")

        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes, self.guidance_input, self.backend = num_classes, guidance_input, backend
        self.norm_mode = norm_mode
        emb_dim = model_channels * emb_mult
        self.embed = ConditionEmbedding(emb_dim, pos_dim=model_channels, num_classes=num_classes,
                                        guidance_input=guidance_input, time_scale=time_scale, backend=backend)
        common = dict(num_groups=num_groups, norm_mode=norm_mode, dropout=dropout, skip_scale=skip_scale,
                      backend=backend)
        attn_kw = dict(num_groups=num_groups, num_heads=num_heads, head_dim=head_dim, skip_scale=skip_scale,
                       backend=backend)

        self.in_conv = Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self._down_keep: list[bool] = []  # whether the output after down[i] is a skip connection
        skips, ch = [model_channels], model_channels
        for level, (w, res) in enumerate(zip(widths, resolutions)):
            for _ in range(num_blocks):
                self.down.append(ResBlock(ch, w, emb_dim, **common))
                ch = w
                if res in attn_resolutions:
                    self._down_keep.append(False)
                    self.down.append(AttentionBlock(ch, **attn_kw))
                self._down_keep.append(True)
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(ResBlock(ch, ch, emb_dim, resample="down", **common))
                self._down_keep.append(True)
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, **common), AttentionBlock(ch, **attn_kw),
                                  ResBlock(ch, ch, emb_dim, **common)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w, res = widths[level], resolutions[level]
            for _ in range(num_blocks + 1):
                blk = ResBlock(ch + skips.pop(), w, emb_dim, **common)
                blk.takes_skip = True
                self.up.append(blk)
                ch = w
                if res in attn_resolutions:
                    self.up.append(AttentionBlock(ch, **attn_kw))
            if level > 0:
                self.up.append(ResBlock(ch, ch, emb_dim, resample="up", **common))
        self.out_norm = GroupNormAct(ch, num_groups, "silu", backend=backend)
        self.out_conv = Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)  # the 4-D conv weights

    # -----------------------------------------------------------------------------------------
    def set_backend(self, backend: str | None) -> UNet:
        """Route every fused op to `backend` (None/"auto": automatic; "reference": plain PyTorch)."""
        set_backend(self, backend)
        return self

    def embed_time(self, t: torch.Tensor) -> dict:
        """{"time_emb": ...}: the time conditioning of `t`, computed once (the `time_kwargs` hook of
        scm.sampling.ConsistencySamplerGraph); forward(..., time_emb=...) then skips it."""
        return {"time_emb": self.embed.embed_time(t)}

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (self.img_resolution,) * 2:
            R = self.img_resolution
            raise ValueError(f"{OP}: x must be (B, {self.in_channels}, {R}, {R}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"{OP}: t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, t)
        emb = self.embed(t, class_labels, guidance, time_emb)
        h = self.in_conv(self._layout(x))
        skips = [h]
        for blk, keep in zip(self.down, self._down_keep):
            h = blk(h, emb)
            if keep:
                skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.up:
            if getattr(blk, "takes_skip", False):
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.out_conv(self.out_norm(h)).to(x.dtype).contiguous()

    def forward_jvp(self, x: torch.Tensor, t: torch.Tensor, x_dot: torch.Tensor, t_dot: torch.Tensor,
                    class_labels: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                    time_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, dF/dx . x_dot + dF/dt . t_dot), block by block (A13); attention through
        scm_kernels.attention_jvp. Draws dropout masks in forward's order. With time_emb given, the
        time is held fixed (t_dot ignored)."""
        self._check_input(x, t)
        if time_emb is None:
            emb, emb_dot = block_jvp(lambda tt: self.embed(tt, class_labels, guidance), (t,), (t_dot,))
        else:
            emb = self.embed(t, class_labels, guidance, time_emb)
            emb_dot = torch.zeros_like(emb)
        h, h_dot = block_jvp(self.in_conv, (self._layout(x),), (self._layout(x_dot),))
        skips = [(h, h_dot)]
        for blk, keep in zip(self.down, self._down_keep):
            h, h_dot = blk.forward_jvp(h, h_dot, emb, emb_dot)
            if keep:
                skips.append((h, h_dot))
        for blk in self.mid:
            h, h_dot = blk.forward_jvp(h, h_dot, emb, emb_dot)
        for blk in self.up:
            if getattr(blk, "takes_skip", False):
                s, s_dot = skips.pop()
                h, h_dot = torch.cat([h, s], dim=1), torch.cat([h_dot, s_dot], dim=1)
            h, h_dot = blk.forward_jvp(h, h_dot, emb, emb_dot)
        out, out_dot = block_jvp(lambda a: self.out_conv(self.out_norm(a)), (h,), (h_dot,))
        return out.to(x.dtype).contiguous(), out_dot.to(x.dtype).contiguous()
