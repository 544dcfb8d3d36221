"""Plain-PyTorch sCM loss (A14-A17): the oracle of the tests and the `reference` backend.

Written directly from the formulas of shared/docs/algorithm.md, in the inputs' dtype (PyTorch's
usual type promotion when dtypes are mixed; float64 inputs give the float64 oracle):

    (A14)  g  = -cos^2 t * (sigma_d * F_minus - dxt_dt) - r * (cos t * sin t * x_t + sigma_d * J)
    (A16)  g^ = g / (||g||_2 + c)                       per sample
    (A17)  L  = exp(-logvar) / D * ||F - F_minus - g^||^2 + logvar      (no logvar: weight 1, no term)

F carries the gradient. F_minus (default F.detach()), J = jvp_out, x_t, dxt_dt and t are
stop-gradient (the theta^- side of Algorithm 1): they are detached here, so they get neither a
gradient nor a tangent; logvar is differentiable.
"""

from __future__ import annotations

import torch


def _per_sample(v, B: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """A number, a 1-element tensor or a B-element tensor as a (B, 1, ..., 1) tensor."""
    if not isinstance(v, torch.Tensor):
        v = torch.tensor(float(v), dtype=like.dtype, device=like.device)
    v = v.reshape(-1) if v.numel() == B else v.reshape(1).expand(B)
    return v.reshape((B,) + (1,) * (ndim - 1))


def normalized_tangent(F_minus, jvp_out, x_t, dxt_dt, tt, sigma_d, r, c):
    """g^ of (A14)/(A16) per sample, from stop-gradient operands of shape (B, ...) and times tt that
    broadcast against them as (B, 1, ..., 1)."""
    B = F_minus.shape[0]
    cos_t, sin_t = torch.cos(tt), torch.sin(tt)
    # (A14)
    g = -cos_t**2 * (sigma_d * F_minus - dxt_dt) - r * (cos_t * sin_t * x_t + sigma_d * jvp_out)
    # (A16)
    gnorm = torch.sqrt((g * g).reshape(B, -1).sum(dim=1)).reshape(tt.shape)
    return g / (gnorm + c)


def scm_loss(F, jvp_out, x_t, dxt_dt, t, logvar=None, F_minus=None, sigma_d=0.5, r=1.0, c=0.1):
    """Per-sample sCM loss (B,) from (A14)-(A17); see the module docstring."""
    B, nd = F.shape[0], F.dim()
    D = F[0].numel()
    Fm = (F if F_minus is None else F_minus).detach()  # F^- = stopgrad (theta^-)
    J, x, dx = jvp_out.detach(), x_t.detach(), dxt_dt.detach()
    tt = _per_sample(t.detach() if isinstance(t, torch.Tensor) else t, B, nd, F)
    g_hat = normalized_tangent(Fm, J, x, dx, tt, sigma_d, r, c)
    # (A17)
    sqerr = ((F - Fm - g_hat) ** 2).reshape(B, -1).sum(dim=1)
    if logvar is None:
        return sqerr / D
    lv = logvar.reshape(B)
    return torch.exp(-lv) / D * sqerr + lv
