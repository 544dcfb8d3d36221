"""Multi-head attention modules on `scm_kernels.attention`: forward-mode differentiable end to end.

`Attention` is a self-/cross-attention layer for (B, C, H, W) feature maps (U-Net attention over the
H*W positions) and (B, N, C) token sequences; `AttentionProcessor` routes the attention core of
diffusers models to `scm_kernels.attention`, so that torch.func.jvp of a whole diffusers UNet or
DiT works (PyTorch's fused SDPA kernels have no JVP; section 5 of algorithm.md, A24-A25).

One layer, for tokens x (B, N, dim) and, for cross-attention, context c (B, M, context_dim):
    q, k, v = split(x W_qkv^T + b_qkv)                   self-attention: one fused projection
    q = x W_q^T + b_q;  k, v = split(c W_kv^T + b_kv)     cross-attention: two projections
    q, k <- rmsnorm(q) * g_q, rmsnorm(k) * g_k           optional QK norm, per head over head_dim
                                                         (pixel norm A11 over the head dim, gain g)
    o_h = softmax(lambda q_h k_{h'}^T + mask) v_{h'}     h' = h // (num_heads / num_kv_heads) (GQA)
    y = concat_h(o_h) W_o^T + b_o                        (A24-A26 give its tangent and gradient)

Layout: a projection's output (B, N, heads * head_dim) is viewed as (B, N, heads, head_dim) and
handed to the kernels transposed, as (B, heads, N, head_dim): no copy (the kernels take strided
inputs with inner stride 1). The kernels write their output as (B, Nq, heads, head_dim) memory, so
the (B, N, heads * head_dim) input of the output projection is a free view too. A (B, C, H, W)
input becomes (B, H*W, C) tokens by a view (contiguous input: the projection reads it transposed;
channels_last input: already token-major), and the (B, C_out, H, W) output comes back in the
input's memory format (a free view for channels_last input, one copy of the output for contiguous
input: see _like_map).

Everything in the layer is forward-mode differentiable (linear maps, the RMS norm in plain PyTorch,
`scm_kernels.attention` through its JVP), and with backend="reference" the same layer runs in plain
PyTorch, which is how the tests check the kernel backends on whole models. The tangent is meant to
be taken under torch.no_grad, as sCM training does (A13); a loss on the tangent itself, differentiated
in reverse mode, needs `scm_kernels.attention_jvp` (A27) rather than torch.func.jvp of this layer.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from scm_kernels import _checks, backend as _backend
from scm_kernels.attention import PRECISIONS, attention

__all__ = ["Attention", "AttentionProcessor", "HeadRMSNorm"]

OP = "scm_kernels.nn.Attention"
OP_PROC = "scm_kernels.nn.AttentionProcessor"
QK_NORMS = (None, "rmsnorm")


class HeadRMSNorm(nn.Module):
    """RMS norm over the last dim with a learnable gain: x / sqrt(mean(x^2) + eps) * weight.

    The pixel norm (A11) over a head's features, computed in at least float32 and returned in the
    input's dtype. Used for QK normalization (one gain of size head_dim shared by all heads).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _heads(dim: int, num_heads, head_dim) -> tuple[int, int]:
    """(num_heads, head_dim) from the ones given; the missing one must divide dim."""
    if num_heads is None and head_dim is None:
        raise ValueError(f"{OP}: give num_heads or head_dim (or both)")
    if num_heads is not None:
        num_heads = _checks.integer(num_heads, "num_heads", OP, min_value=1)
    if head_dim is not None:
        head_dim = _checks.integer(head_dim, "head_dim", OP, min_value=1)
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"{OP}: dim ({dim}) must be divisible by num_heads ({num_heads}) "
                             "when head_dim is not given")
        head_dim = dim // num_heads
    elif num_heads is None:
        if dim % head_dim:
            raise ValueError(f"{OP}: dim ({dim}) must be divisible by head_dim ({head_dim}) "
                             "when num_heads is not given")
        num_heads = dim // head_dim
    return num_heads, head_dim


def _tokens(x: torch.Tensor, name: str, channels: int) -> torch.Tensor:
    """(B, N, C) tokens of a (B, N, C) sequence or a (B, C, H, W) feature map (a view, no copy)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4:
        if x.shape[1] != channels:
            raise ValueError(f"{OP}: {name} of shape {tuple(x.shape)} is read as (B, C, H, W) and must have "
                             f"C = {channels} channels")
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 3:
        if x.shape[2] != channels:
            raise ValueError(f"{OP}: {name} of shape {tuple(x.shape)} is read as (B, N, C) and must have "
                             f"C = {channels} features")
        return x
    raise ValueError(f"{OP}: {name} must be (B, N, C) tokens or a (B, C, H, W) feature map, got shape "
                     f"{tuple(x.shape)}")


def _bhnd(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, N, heads * head_dim) -> (B, N, heads, head_dim) view (the projection's memory)."""
    return x.unflatten(-1, (heads, head_dim))


def _like_map(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (B, C, H, W) view y of (B, H*W, C) memory, in the memory format of the input map x.

    For a channels_last x this is y itself; for a contiguous x, one copy. Returning the channels_last
    view for a contiguous input would be free, but torch's GroupNorm (and so the next U-Net block)
    fails under torch.func.jvp on a channels_last input (a `view` in its JVP formula, torch 2.13)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


class Attention(nn.Module):
    """Multi-head self- or cross-attention on the fused kernels, with forward-mode AD (A24-A26).

    Args:
        dim: channels of the input x (C of (B, C, H, W), or the last dim of (B, N, C)).
        num_heads: query heads. head_dim: features per head. Give either or both; the missing one is
            dim // the other (which must divide dim). The attention width is num_heads * head_dim,
            which may differ from dim when both are given.
        context_dim: channels of the context for cross-attention. None: self-attention with one fused
            qkv projection (`to_qkv`); given: separate `to_q` (from x) and `to_kv` (from the context).
        num_kv_heads: key/value heads (grouped-query attention; 1 is multi-query); must divide
            num_heads. Default num_heads.
        out_dim: channels of the output; default dim.
        qkv_bias, out_bias: biases of the input and output projections.
        qk_norm: None/False, or "rmsnorm"/True: RMS-normalize q and k per head over head_dim with a
            learnable gain each (`norm_q`, `norm_k`, size head_dim, shared by the heads): bounds the
            logits, the usual cure for attention-logit growth in large diffusion transformers.
        eps: epsilon of the QK norm.
        is_causal: causal self-attention (key j visible to query i iff j <= i, as torch's is_causal).
        scale: logit scale; default 1 / sqrt(head_dim).
        zero_init_out: zero the output projection (weight and bias) at init, so that a residual block
            `x + attn(norm(x))` starts as the identity (as ADM/improved-diffusion U-Nets do); the
            other parameters keep PyTorch's nn.Linear initialization.
        backend, precision: passed to scm_kernels.attention on every call (None: automatic; the
            `use_backend` context applies). Plain attributes, so they can be changed after
            construction (e.g. backend="reference" to run the layer in plain PyTorch).
        device, dtype: of the parameters.

    forward(x, context=None, attn_mask=None):
        x: (B, dim, H, W) -> (B, out_dim, H, W) (attention over the H*W positions; the result has
            x's memory format, contiguous or channels_last), or (B, N, dim) -> (B, N, out_dim).
        context: cross-attention only: (B, M, context_dim) tokens or a (B, context_dim, H', W') map.
            None in a cross-attention layer attends to x itself (needs context_dim == dim).
        attn_mask: None, or bool (True = attend) / float (added to the logits), broadcastable to
            (B, num_heads, N, M) (the semantics of F.scaled_dot_product_attention). A query row whose
            keys are all masked gives 0, never NaN.

    Dropout is not offered: sCM training differentiates the network in forward mode, where the
    primal and tangent passes must see the same function.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        head_dim: int | None = None,
        *,
        context_dim: int | None = None,
        num_kv_heads: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        qk_norm: bool | str | None = None,
        eps: float = 1e-6,
        is_causal: bool = False,
        scale: float | None = None,
        zero_init_out: bool = False,
        backend: str | None = None,
        precision: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dim = _checks.integer(dim, "dim", OP, min_value=1)
        num_heads, head_dim = _heads(dim, num_heads, head_dim)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        num_kv_heads = _checks.integer(num_kv_heads, "num_kv_heads", OP, min_value=1)
        if num_heads % num_kv_heads:
            raise ValueError(f"{OP}: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if context_dim is not None:
            context_dim = _checks.integer(context_dim, "context_dim", OP, min_value=1)
        out_dim = dim if out_dim is None else _checks.integer(out_dim, "out_dim", OP, min_value=1)
        if qk_norm is True:
            qk_norm = "rmsnorm"
        elif qk_norm is False:
            qk_norm = None
        _checks.choice(qk_norm, "qk_norm", OP, QK_NORMS)
        if not isinstance(is_causal, bool):
            raise TypeError(f"{OP}: is_causal must be a bool, got {type(is_causal).__name__}")
        if backend is not None:
            _backend.requested_backend(backend)  # validates the name
        if precision is not None:
            _checks.choice(precision, "precision", OP, PRECISIONS)

        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.num_kv_heads, self.context_dim, self.out_dim = num_kv_heads, context_dim, out_dim
        self.is_causal = is_causal
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else _checks.number(scale, "scale", OP)
        self.backend, self.precision = backend, precision

        fk = dict(device=device, dtype=dtype)
        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, q_width + 2 * kv_width, bias=qkv_bias, **fk)
            self.to_q = self.to_kv = None
        else:
            self.to_qkv = None
            self.to_q = nn.Linear(dim, q_width, bias=qkv_bias, **fk)
            self.to_kv = nn.Linear(context_dim, 2 * kv_width, bias=qkv_bias, **fk)
        if qk_norm is None:
            self.norm_q = self.norm_k = None
        else:
            self.norm_q = HeadRMSNorm(head_dim, eps, **fk)
            self.norm_k = HeadRMSNorm(head_dim, eps, **fk)
        self.to_out = nn.Linear(q_width, out_dim, bias=out_bias, **fk)
        if zero_init_out:
            nn.init.zeros_(self.to_out.weight)
            if self.to_out.bias is not None:
                nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = _tokens(x, "x", self.dim)
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.to_qkv is not None:
            if context is not None:
                raise ValueError(f"{OP}: got a context, but this layer was built for self-attention; pass "
                                 "context_dim=... at construction for cross-attention")
            q, k, v = self.to_qkv(tokens).split((Hq * D, Hkv * D, Hkv * D), dim=-1)
        else:
            if context is None:
                if self.context_dim != self.dim:
                    raise ValueError(f"{OP}: this cross-attention layer needs a context (context_dim = "
                                     f"{self.context_dim} differs from dim = {self.dim})")
                source = tokens
            else:
                source = _tokens(context, "context", self.context_dim)
                if source.shape[0] != tokens.shape[0]:
                    raise ValueError(f"{OP}: context has batch size {source.shape[0]} but x has "
                                     f"{tokens.shape[0]}")
            q = self.to_q(tokens)
            k, v = self.to_kv(source).split(Hkv * D, dim=-1)
        q, k, v = _bhnd(q, Hq, D), _bhnd(k, Hkv, D), _bhnd(v, Hkv, D)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        # (B, N, H, D) memory viewed as (B, H, N, D): the kernels read the strides, nothing is copied.
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, self.is_causal,
                      self.scale, Hq != Hkv, backend=self.backend, precision=self.precision)
        # The kernels' output is (B, N, H, D) memory: this reshape is a view (a copy for the reference).
        y = self.to_out(o.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], Hq * D))
        if x.dim() == 4:
            return _like_map(y.transpose(1, 2).unflatten(2, x.shape[2:]), x)
        return y

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        if self.context_dim is not None:
            s += f", context_dim={self.context_dim}"
        if self.out_dim != self.dim:
            s += f", out_dim={self.out_dim}"
        if self.norm_q is not None:
            s += ", qk_norm='rmsnorm'"
        if self.is_causal:
            s += ", is_causal=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------
def _diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


class AttentionProcessor:
    """Attention processor for diffusers models that runs the attention core on scm_kernels.attention.

    A drop-in for diffusers' AttnProcessor2_0 (and AttnProcessor / FusedAttnProcessor2_0): use it as
    `model.set_attn_processor(AttentionProcessor())` or `attn.set_processor(AttentionProcessor())`,
    after which torch.func.jvp of the whole model works (A24-A25) and backward uses the fused
    kernels (A26). It does what AttnProcessor2_0 does, in the same order: spatial_norm (with temb),
    4-D (B, C, H, W) inputs, attn.prepare_attention_mask, group_norm, cross-attention with norm_cross,
    norm_q / norm_k, the output projection and its dropout, residual_connection and
    rescale_output_factor. Beyond AttnProcessor2_0 it also honours attn.scale (scale_qk=False),
    attn.is_causal, kv_heads (grouped-query attention) and fused projections (attn.fuse_projections).

    Differences: 4-D outputs come back in the input's memory format (AttnProcessor2_0 returns a
    channels_last view, on which the next torch GroupNorm fails under torch.func.jvp); a query row
    whose keys are all masked gives 0 (SDPA gives NaN); the softmax is always accumulated in fp32
    (as upcast_softmax asks). Layers with added key/value projections (added_kv_proj_dim:
    AttnAddedKVProcessor) are refused with a clear error, as are layers that are not diffusers'
    `Attention` (e.g. the joint-attention classes of SD3/Flux, which have their own processors).

    Args:
        backend, precision: passed to scm_kernels.attention (None: automatic).

    Constructing it needs diffusers installed (importing scm_kernels.nn does not).
    """

    def __init__(self, backend: str | None = None, precision: str | None = None) -> None:
        if not _diffusers_available():
            raise ImportError(f"{OP_PROC} is an attention processor for diffusers models and needs diffusers "
                              "installed (pip install diffusers); scm_kernels.nn.Attention does not need it")
        if backend is not None:
            _backend.requested_backend(backend)  # validates the name
        if precision is not None:
            _checks.choice(precision, "precision", OP_PROC, PRECISIONS)
        self.backend, self.precision = backend, precision

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, precision={self.precision!r})"

    @staticmethod
    def _check(attn) -> None:
        from diffusers.models.attention_processor import Attention as DiffusersAttention

        if not isinstance(attn, DiffusersAttention):
            raise TypeError(f"{OP_PROC}: works on diffusers.models.attention_processor.Attention layers, got "
                            f"{type(attn).__name__}")
        if attn.added_kv_proj_dim is not None:
            raise NotImplementedError(f"{OP_PROC}: attention layers with added key/value projections "
                                      "(added_kv_proj_dim) are not supported; keep their own processor")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check(attn)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        B, N = hidden_states.shape[:2]
        source_length = N if encoder_hidden_states is None else encoder_hidden_states.shape[1]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source_length, B)
            # (B * heads, Nq or 1, Nk) -> (B, heads, Nq or 1, Nk), broadcast over the queries.
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        fused = getattr(attn, "fused_projections", False)
        if fused and encoder_hidden_states is None and getattr(attn, "to_qkv", None) is not None:
            qkv = attn.to_qkv(hidden_states)
            q_width = attn.to_q.out_features
            kv_width = (qkv.shape[-1] - q_width) // 2
            query, key, value = qkv.split((q_width, kv_width, kv_width), dim=-1)
        else:
            query = attn.to_q(hidden_states)
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if fused and encoder_hidden_states is not None and getattr(attn, "to_kv", None) is not None:
                key, value = attn.to_kv(source).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(source), attn.to_v(source)

        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = _bhnd(query, attn.heads, head_dim)
        key = _bhnd(key, kv_heads, head_dim)
        value = _bhnd(value, kv_heads, value.shape[-1] // kv_heads)
        if attn.norm_q is not None:  # per-head norms over head_dim: the same before the transpose
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # (B, N, heads, head_dim) memory viewed as (B, heads, N, head_dim): no copies.
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        hidden_states = attention(query, key, value, attention_mask, bool(getattr(attn, "is_causal", False)),
                                  attn.scale, kv_heads != attn.heads, backend=self.backend,
                                  precision=self.precision)
        hidden_states = hidden_states.transpose(1, 2).reshape(B, -1, attn.heads * hidden_states.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = _like_map(hidden_states.transpose(-1, -2).unflatten(-1, (H, W)), residual)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
