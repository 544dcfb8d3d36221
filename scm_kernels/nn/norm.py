"""AdaptiveGroupNorm: GroupNorm modulated by a (time) embedding, fused with SiLU (A11, A28).

    s, b = Linear(emb).chunk(2)                               (emb_dim -> 2 C)
    mode "adagn":  y = act(GN(x; gamma, beta) * (1 + s) + b)          classic AdaGN
    mode "double": y = act(GN(x; gamma, beta) * pnorm(s) + pnorm(b))  adaptive double normalization
                   (sCM, sec. 5: pnorm(v) = v / sqrt(mean_c(v^2) + eps), A11, over the channels)

One fused scm_kernels.group_norm call does the normalization, the modulation and the activation;
forward, backward and torch.func.jvp all run through the fused kernels (the projection is a plain
nn.Linear, the pixel norm scm_kernels.pixel_norm).
"""

from __future__ import annotations

import torch
from torch import nn

from scm_kernels.group_norm import group_norm
from scm_kernels.pixel_norm import pixel_norm

MODES = ("adagn", "double")


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm(num_groups, channels) with scale/shift projected from an embedding, then `activation`.

    Args:
        channels: C of the input (N, C, *spatial).
        emb_dim: width of the embedding (N, emb_dim).
        num_groups: G, divides channels.
        mode: "adagn" (scale = 1 + s) or "double" (scale = pnorm(s), shift = pnorm(b)).
        activation: "silu" or None.
        eps: GroupNorm epsilon; pnorm_eps: pixel-norm epsilon ("double").
        affine: learnable per-channel gamma, beta of the norm (init 1, 0).
        backend: passed to the ops (None: automatic).
    The projection is initialised to zero in "adagn" mode (the block starts as a plain GroupNorm),
    with PyTorch's default Linear init in "double" mode (pnorm of an all-zero vector is zero).
    """

    def __init__(self, channels: int, emb_dim: int, num_groups: int = 32, mode: str = "adagn",
                 activation: str | None = "silu", eps: float = 1e-5, pnorm_eps: float = 1e-8, affine: bool = True,
                 backend: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"AdaptiveGroupNorm: mode must be one of {MODES}, got {mode!r}")
        if channels % num_groups:
            raise ValueError(f"AdaptiveGroupNorm: num_groups must divide channels = {channels}, got {num_groups}")
        self.channels, self.num_groups, self.mode = channels, num_groups, mode
        self.activation, self.eps, self.pnorm_eps, self.backend = activation, eps, pnorm_eps, backend
        self.proj = nn.Linear(emb_dim, 2 * channels)
        if mode == "adagn":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def modulation(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (N, C), of the mode (A11)."""
        s, b = self.proj(emb).chunk(2, dim=1)
        if self.mode == "adagn":
            return 1 + s, b
        return (pixel_norm(s, 1, self.pnorm_eps, backend=self.backend),
                pixel_norm(b, 1, self.pnorm_eps, backend=self.backend))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(emb.to(self.proj.weight.dtype))
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift,
                          activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_groups={self.num_groups}, mode={self.mode!r}, "
                f"activation={self.activation!r}, eps={self.eps}")
