"""Building blocks of the sCM networks (U-Net and DiT), on the fused ops of scm_kernels.

Every block has a plain ``forward`` (differentiable in reverse and forward mode: torch.func.jvp over
a whole model works, every fused op has a JVP rule) and a per-layer ``forward_jvp`` that returns the
output and its tangent together (the "layer" JVP path of scm.losses.model_jvp, A13). Attention
blocks compute their tangent with ``scm_kernels.attention_jvp`` (A24-A25, one fused pass for the
primal and the tangent); the other blocks are small enough to go through torch.func.jvp
(scm.losses.block_jvp), whose rules for the fused ops are their kernels' JVPs.

Every fused op of a block reads the block's ``backend`` attribute (None: automatic choice by
device; "reference": plain PyTorch, the oracle the tests compare with); ``set_backend`` on the
networks rewrites it everywhere.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import scm_kernels
from scm.losses import block_jvp, detach_tangents, tangent_arithmetic
from scm_kernels.group_norm import group_norm
from scm_kernels.nn import AdaptiveGroupNorm, Attention
from scm_kernels.time_embedding import reference as _time_embedding_ref

__all__ = [
    "BACKENDS", "AttentionBlock", "ConditionEmbedding", "Conv2d", "GroupNormAct", "Linear", "ResBlock",
    "attention_tokens_jvp",
    "check_backend", "set_backend",
]

BACKENDS = (None, "auto", "reference", "cpu", "triton", "cuda")


def check_backend(backend, where: str) -> str | None:
    """The backend name (None for automatic; "auto" is accepted as None); ValueError otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")
    return None if backend == "auto" else backend


def set_backend(module: nn.Module, backend: str | None) -> None:
    """Route every fused op under `module` to `backend` (None/"auto": automatic)."""
    backend = check_backend(backend, "set_backend")
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend


# ---------------------------------------------------------------------------------------------
# Linear layers whose forward-mode rule skips the weight's zero tangent
# ---------------------------------------------------------------------------------------------
def _input_tangent(x: torch.Tensor, *params: torch.Tensor | None):
    """(primal, tangent) of x when x carries a tangent of the innermost forward-AD level
    (torch.func.jvp, forward_ad.dual_level) and none of `params` does; None otherwise."""
    if fwAD._current_level < 0 or torch.compiler.is_compiling():
        return None
    px, tx = fwAD.unpack_dual(x)
    if tx is None or any(p is not None and fwAD.unpack_dual(p).tangent is not None for p in params):
        return None
    return px, tx


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose JVP w.r.t. its input is W x_dot.

    PyTorch's forward-mode rule of linear / addmm also multiplies x by the weight's tangent, which
    is a materialized zero when only the input is differentiated (the sCM JVP, A13): one wasted
    matrix product per layer. Here, when only x carries a tangent, the primal and W x_dot are formed
    and returned as a dual tensor; reverse mode flows through both as usual. Otherwise (no tangent,
    or tangents on the parameters too) this is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = _input_tangent(x, self.weight, self.bias)
        if d is None:
            return F.linear(x, self.weight, self.bias)
        px, tx = d
        return fwAD.make_dual(F.linear(px, self.weight, self.bias), F.linear(tx, self.weight))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) whose JVP w.r.t. its input is conv(x_dot, W)
    without bias: PyTorch's rule runs a third convolution, of x with the weight's zero tangent (a
    third of the JVP pass of a U-Net, measured). Same contract as `Linear`; padding modes other than
    "zeros" take F.conv2d's path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = _input_tangent(x, self.weight, self.bias) if self.padding_mode == "zeros" else None
        if d is None:
            return super().forward(x)
        px, tx = d
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        y, y_dot = F.conv2d(px, self.weight, self.bias, **kw), F.conv2d(tx, self.weight, None, **kw)
        return fwAD.make_dual(y, y_dot)


# ---------------------------------------------------------------------------------------------
# Conditioning: time (A10) + class label + guidance scale
# ---------------------------------------------------------------------------------------------
def _embed_scalar(t: torch.Tensor, dim: int, max_period: float, time_scale: float, dtype: torch.dtype,
                  backend: str | None) -> torch.Tensor:
    """Positional embedding (A10) of a (B,) tensor, always computed outside autocast: in float32 by
    scm_kernels.time_embedding, or in float64 by the plain reference when the model is float64."""
    with torch.autocast(t.device.type, enabled=False):
        if dtype == torch.float64:
            return _time_embedding_ref.time_embedding(t.to(torch.float64), dim, kind="positional",
                                                      max_period=max_period, time_scale=time_scale,
                                                      compute_dtype=torch.float64)
        emb = scm_kernels.time_embedding(t.reshape(-1), dim, max_period=max_period, time_scale=time_scale,
                                         backend=backend)
        return emb if dtype == torch.float32 else emb.to(dtype)


class ConditionEmbedding(nn.Module):
    """emb = SiLU(MLP(pos(c_noise(t))) + E[label] + MLP_g(pos(guidance))), shape (B, emb_dim).

    The positional embedding (A10, c_noise(t) = t, scale `time_scale`) is computed in float32 outside
    autocast (float64 for float64 models), then a Linear-SiLU-Linear MLP (ADM). Class labels index an
    embedding table with one extra row, index num_classes, the "null" label of classifier-free
    guidance (labels None mean all null). An optional guidance-scale input (sCD students of a CFG
    teacher, A12) gets its own positional embedding and MLP, zero-initialised so that it starts
    without effect. The final SiLU is the input nonlinearity of every block's modulation projection.
    """

    def __init__(self, emb_dim: int, *, pos_dim: int, num_classes: int = 0, guidance_input: bool = False,
                 time_scale: float = 1000.0, max_period: float = 10000.0, guidance_scale: float = 100.0,
                 backend: str | None = None):
        super().__init__()
        self.pos_dim, self.num_classes, self.backend = pos_dim, num_classes, backend
        self.time_scale, self.max_period, self.guidance_scale = time_scale, max_period, guidance_scale
        self.time_mlp = nn.Sequential(Linear(pos_dim, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        if guidance_input:
            self.guidance_mlp = nn.Sequential(Linear(pos_dim, emb_dim), nn.SiLU(),
                                              Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_mlp[2].weight)
            nn.init.zeros_(self.guidance_mlp[2].bias)
        else:
            self.guidance_mlp = None

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """MLP(pos(t)): the time branch alone (the `time_kwargs` hook of ConsistencySamplerGraph)."""
        dtype = self.time_mlp[0].weight.dtype
        pos = _embed_scalar(t, self.pos_dim, self.max_period, self.time_scale, dtype, self.backend)
        return self.time_mlp(pos)

    def forward(self, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed_time(t) if time_emb is None else time_emb
        B = emb.shape[0]
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full((B,), self.num_classes, dtype=torch.long, device=emb.device)
            elif class_labels.dim() != 1 or class_labels.shape[0] != B or class_labels.is_floating_point():
                raise ValueError(f"class_labels must be a ({B},) integer tensor (num_classes = null label), "
                                 f"got {tuple(class_labels.shape)} {class_labels.dtype}")
            emb = emb + self.label_emb(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (num_classes = 0)")
        if self.guidance_mlp is not None:
            if guidance is None:
                raise ValueError("this network takes a guidance scale (guidance_input=True): pass "
                                 "guidance=(B,) tensor")
            g = _embed_scalar(guidance.detach().reshape(-1).expand(B), self.pos_dim, self.max_period,
                              self.guidance_scale, self.time_mlp[0].weight.dtype, self.backend)
            emb = emb + self.guidance_mlp(g).to(emb.dtype)
        elif guidance is not None:
            raise ValueError("guidance given to a network built without a guidance input "
                             "(guidance_input=False)")
        return F.silu(emb)


# ---------------------------------------------------------------------------------------------
# U-Net blocks
# ---------------------------------------------------------------------------------------------
class GroupNormAct(nn.Module):
    """GroupNorm with affine gamma, beta, optionally followed by SiLU: one fused group_norm (A28)."""

    def __init__(self, channels: int, num_groups: int, activation: str | None = "silu", eps: float = 1e-5,
                 backend: str | None = None):
        super().__init__()
        self.num_groups, self.activation, self.eps, self.backend = num_groups, activation, eps, backend
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation,
                          backend=self.backend)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        # Nearest 2x, F.interpolate(x, scale_factor=2, mode="nearest") bitwise, as two broadcast copies:
        # each column doubled, then each (doubled) row. Their backward sums adjacent pairs, once along W
        # and once along whole rows. CPU, 2 threads, (64, 48, 16, 16) fp32: forward + backward 4.4 ms,
        # against 8.9 for F.interpolate and 19.4 for one 6-D expand (whose backward, a sum over two
        # strided size-2 dims, took 10 ms). A channels-last map goes through F.interpolate, whose
        # channels-last CPU kernels copy whole C-vectors (fwd + bwd 1.3 ms at that shape, against 3.2
        # for the two copies over (B, H, W, C) memory) and keep the layout.
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        B, C, H, W = x.shape
        x = x.unsqueeze(-1).expand(B, C, H, W, 2).reshape(B, C, H, 2 * W)
        return x.unsqueeze(3).expand(B, C, H, 2, 2 * W).reshape(B, C, 2 * H, 2 * W)
    return x


class ResBlock(nn.Module):
    """Residual block of an ADM/EDM U-Net (BigGAN style, resampling inside the block):

        h = conv3x3(resample(SiLU(GN(x))))
        h = conv3x3(dropout(AdaptiveGroupNorm(h, emb)))      (A11 "adagn" or "double", A28, fused SiLU)
        y = (skip(resample(x)) + h) * skip_scale             (skip: 1x1 conv when channels change)

    The last conv starts at zero, so the block starts as the (scaled) identity path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, num_groups: int, norm_mode: str = "adagn",
                 dropout: float = 0.0, resample: str | None = None, skip_scale: float = 1.0,
                 backend: str | None = None):
        super().__init__()
        self.resample, self.skip_scale = resample, skip_scale
        self.norm1 = GroupNormAct(in_ch, num_groups, "silu", backend=backend)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = AdaptiveGroupNorm(out_ch, emb_dim, num_groups, mode=norm_mode, activation="silu",
                                       backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = _resample(self.norm1(x), self.resample)
        x = _resample(x, self.resample)
        h = self.conv2(self.dropout(self.norm2(self.conv1(h), emb)))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * self.skip_scale

    def forward_jvp(self, x, x_dot, emb, emb_dot):
        return block_jvp(self.forward, (x, emb), (x_dot, emb_dot))


def attention_tokens_jvp(attn: Attention, tokens: torch.Tensor, tokens_dot: torch.Tensor):
    """(y, y_dot) of a self-attention layer `attn` on (B, N, C) tokens, through
    scm_kernels.attention_jvp (A24-A25): the primal and the tangent in one fused pass. The linear
    projections carry the tangent without their bias; the optional QK norm goes through
    torch.func.jvp. Inside scm.losses.tangents_without_grad (SCMLoss's merged pass) the tangent
    carries no gradient: its projections run without autograd and the attention keeps only the
    primal's backward (attention_jvp(differentiable_tangent=False))."""
    if attn.to_qkv is None:
        raise ValueError("attention_tokens_jvp: only self-attention layers (no context_dim)")
    detach = detach_tangents()
    B, N, _ = tokens.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    widths = (Hq * D, Hkv * D, Hkv * D)
    qkv = attn.to_qkv(tokens)
    with tangent_arithmetic():
        qkv_dot = F.linear(tokens_dot, attn.to_qkv.weight)
    (q, k, v), (qd, kd, vd) = qkv.split(widths, -1), qkv_dot.split(widths, -1)
    q, k, v = q.unflatten(-1, (Hq, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    qd, kd, vd = qd.unflatten(-1, (Hq, D)), kd.unflatten(-1, (Hkv, D)), vd.unflatten(-1, (Hkv, D))
    if attn.norm_q is not None:
        q, qd = block_jvp(attn.norm_q, (q,), (qd,))
        k, kd = block_jvp(attn.norm_k, (k,), (kd,))
    tr = lambda a: a.transpose(1, 2)  # noqa: E731  (B, N, H, D) memory as (B, H, N, D)
    o, od = scm_kernels.attention_jvp(tr(q), tr(k), tr(v), tr(qd), tr(kd), tr(vd), is_causal=attn.is_causal,
                                      scale=attn.scale, enable_gqa=Hq != Hkv, backend=attn.backend,
                                      precision=attn.precision, differentiable_tangent=not detach)
    o = o.transpose(1, 2).reshape(B, N, Hq * D)
    od = od.transpose(1, 2).reshape(B, N, Hq * D)
    with tangent_arithmetic():
        od = F.linear(od, attn.to_out.weight)
    return attn.to_out(o), od


class AttentionBlock(nn.Module):
    """y = (x + Attention(GN(x))) * skip_scale over the H*W positions of a (B, C, H, W) map; the
    attention output projection starts at zero (the block starts as the identity)."""

    def __init__(self, channels: int, *, num_groups: int, num_heads: int | None = None,
                 head_dim: int | None = None, skip_scale: float = 1.0, backend: str | None = None):
        super().__init__()
        self.skip_scale = skip_scale
        self.norm = GroupNormAct(channels, num_groups, activation=None, backend=backend)
        self.attn = Attention(channels, num_heads, head_dim, zero_init_out=True, backend=backend)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return (x + self.attn(self.norm(x))) * self.skip_scale

    def forward_jvp(self, x, x_dot, emb=None, emb_dot=None):
        h, h_dot = block_jvp(self.norm, (x,), (x_dot,))
        B, C, H, W = x.shape
        tok = lambda a: a.flatten(2).transpose(1, 2)  # noqa: E731
        y, y_dot = attention_tokens_jvp(self.attn, tok(h), tok(h_dot))
        unmap = lambda a: a.transpose(1, 2).reshape(B, C, H, W)  # noqa: E731
        return (x + unmap(y)) * self.skip_scale, (x_dot + unmap(y_dot)) * self.skip_scale


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (h*w, dim) of a DiT (half the features per axis)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        a = pos[:, None] * omega[None]
        out += [torch.sin(a), torch.cos(a)]
    return torch.cat(out, dim=1).to(torch.float32)
