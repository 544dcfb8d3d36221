"""Plain-PyTorch attention with the semantics of the fused kernels: the oracle of the tests and the
`reference` backend.

Row-wise, for query i with scale lambda (section 5 of algorithm.md):
    s_ij = lambda q_i . k_j + bias_ij,   -inf where a boolean mask is False or causality hides key j
    P = softmax_j(s),   O_i = sum_j P_ij v_j
Causal follows torch's is_causal (key j visible to query i iff j <= i, top-left aligned when
Nq != Nk); a boolean mask and causality may be combined. A row with every key hidden gives O_i = 0
(torch's math SDPA gives NaN there); its gradients are 0 too. GQA: query head h reads kv head
h // (Hq / Hkv).

Plain PyTorch differentiates this function by itself (backward, torch.func.jvp, forward_ad); its
tangent is (A24), and autograd through torch.func.jvp of it is (A27). The softmax is written out
(max-shifted exp, sum, divide) so that fully hidden rows stay finite in every derivative.
"""

from __future__ import annotations

import math

import torch


def expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hq, N, D) for GQA: query head h reads kv head h // (Hq / Hkv)."""
    g = num_q_heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def visible(Nq: int, Nk: int, attn_mask: torch.Tensor | None, is_causal: bool, device) -> torch.Tensor | None:
    """Boolean tensor (broadcastable to (B, H, Nq, Nk)) of the keys each query may attend to, or None
    when every key is visible (no boolean mask, not causal)."""
    keep = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask
    if is_causal:
        causal = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()
        keep = causal if keep is None else keep & causal
    return keep


def logits(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """The scaled, biased, masked logits s (B, Hq, Nq, Nk); -inf where hidden."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa:
        k = expand_kv(k, q.shape[1])
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(s.dtype)
    keep = visible(q.shape[-2], k.shape[-2], attn_mask, is_causal, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def softmax(s: torch.Tensor) -> torch.Tensor:
    """Row softmax that returns 0 for rows whose logits are all -inf (and has finite derivatives)."""
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """softmax(lambda q k^T + mask) v in the inputs' dtype, (B, Hq, Nq, Dv)."""
    if enable_gqa:
        v = expand_kv(v, q.shape[1])
    p = softmax(logits(q, k, attn_mask, is_causal, scale, enable_gqa))
    return torch.matmul(p.to(v.dtype), v)


def lse(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """Natural-log logsumexp of the logits per row (B, Hq, Nq); +inf for fully hidden rows (the
    convention of the kernels: exp(s - lse) = 0 on such rows)."""
    s = logits(q, k, attn_mask, is_causal, scale, enable_gqa)
    out = torch.logsumexp(s, dim=-1)
    return torch.where(torch.isneginf(out), torch.full_like(out, float("inf")), out)


def attention_jvp(q, k, v, tq, tk, tv, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """(out, out_tangent) by torch.func.jvp of `attention`; None tangents are zero."""
    tangents = tuple(torch.zeros_like(x) if t is None else t for x, t in ((q, tq), (k, tk), (v, tv)))
    return torch.func.jvp(lambda a, b, c: attention(a, b, c, attn_mask, is_causal, scale, enable_gqa),
                          (q, k, v), tangents)
