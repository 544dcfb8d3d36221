"""Shared pieces of the scm tests: a small TrigFlow MLP with both JVP paths, closed-form TrigFlow
quantities for Gaussian and Gaussian-mixture data, and the sliced-Wasserstein distance."""

from __future__ import annotations

import torch
from torch import nn

import scm_kernels
from scm.losses import block_jvp
from scm_kernels.time_embedding import reference as te_ref


# ---------------------------------------------------------------------------------------------
# A TrigFlow MLP implementing both JVP paths (whole-model torch.func.jvp and forward_jvp)
# ---------------------------------------------------------------------------------------------
class ToyMLP(nn.Module):
    """F(x, t) = W3 silu(W2 drop(silu(W1 [x | emb(t) | extra]))) with optional class vector and
    guidance-scale inputs. `forward_jvp` propagates tangents layer by layer with hand-written rules
    for Linear / SiLU / dropout (the mask drawn by the same torch.rand call as in forward) and
    block_jvp for the fused time embedding."""

    def __init__(self, dim: int = 3, hidden: int = 32, emb_dim: int = 16, *, p: float = 0.0, time_scale: float = 1.0,
                 n_cond: int = 0, guidance_input: bool = False, embed: str = "fused", dtype=torch.float32):
        super().__init__()
        self.emb_dim, self.p, self.time_scale, self.embed = emb_dim, p, time_scale, embed
        self.n_cond, self.guidance_input = n_cond, guidance_input
        n_in = dim + emb_dim + n_cond + (1 if guidance_input else 0)
        self.l1 = nn.Linear(n_in, hidden, dtype=dtype)
        self.l2 = nn.Linear(hidden, hidden, dtype=dtype)
        self.l3 = nn.Linear(hidden, dim, dtype=dtype)

    def _emb(self, t, dtype):
        if self.embed == "reference64":
            return te_ref.time_embedding(t, self.emb_dim, time_scale=self.time_scale, compute_dtype=torch.float64).to(dtype)
        return scm_kernels.time_embedding(t, self.emb_dim, time_scale=self.time_scale).to(dtype)

    def _extra(self, x, label, guidance):
        parts = []
        if self.n_cond:
            parts.append(torch.zeros(x.shape[0], self.n_cond, dtype=x.dtype) if label is None else label.to(x.dtype))
        if self.guidance_input:
            parts.append(guidance.to(x.dtype).reshape(-1, 1))
        return parts

    def _mask(self, h):
        if not (self.training and self.p > 0):
            return None
        return (torch.rand_like(h) >= self.p).to(h.dtype) / (1 - self.p)

    def forward(self, x, t, label=None, guidance=None):
        x2 = x.reshape(x.shape[0], -1)
        a = torch.cat([x2, self._emb(t, x.dtype)] + self._extra(x, label, guidance), dim=1)
        h = torch.nn.functional.silu(self.l1(a))
        m = self._mask(h)
        if m is not None:
            h = h * m
        h = torch.nn.functional.silu(self.l2(h))
        return self.l3(h).reshape(x.shape)

    def forward_jvp(self, x, t, x_dot, t_dot, label=None, guidance=None):
        def silu_jvp(u, u_dot):
            s = torch.sigmoid(u)
            return torch.nn.functional.silu(u), s * (1 + u * (1 - s)) * u_dot

        x2, xd2 = x.reshape(x.shape[0], -1), x_dot.reshape(x.shape[0], -1)
        e, e_dot = block_jvp(lambda tt: self._emb(tt, x.dtype), (t,), (t_dot,))
        extra = self._extra(x, label, guidance)
        a = torch.cat([x2, e] + extra, dim=1)
        a_dot = torch.cat([xd2, e_dot] + [torch.zeros_like(v) for v in extra], dim=1)
        h, h_dot = silu_jvp(self.l1(a), a_dot @ self.l1.weight.T)
        m = self._mask(h)
        if m is not None:
            h, h_dot = h * m, h_dot * m
        h, h_dot = silu_jvp(self.l2(h), h_dot @ self.l2.weight.T)
        return self.l3(h).reshape(x.shape), (h_dot @ self.l3.weight.T).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Gaussian data x0 ~ N(0, s^2 I): closed forms (algorithm.md sec. 7)
# ---------------------------------------------------------------------------------------------
def gauss_var_t(t, s, sigma_d):
    """Var(x_t) = cos^2 t s^2 + sin^2 t sigma_d^2."""
    return torch.cos(t) ** 2 * s**2 + torch.sin(t) ** 2 * sigma_d**2


def gauss_teacher_F(x, t, s, sigma_d):
    """The exact diffusion F = E[v_t | x_t] / sigma_d, x = x_t / sigma_d (posterior means of z and x0)."""
    tt = t.reshape((-1,) + (1,) * (x.dim() - 1))
    x_t = sigma_d * x
    V = gauss_var_t(tt, s, sigma_d)
    Ez = torch.sin(tt) * sigma_d**2 * x_t / V
    Ex0 = torch.cos(tt) * s**2 * x_t / V
    return (torch.cos(tt) * Ez - torch.sin(tt) * Ex0) / sigma_d


def gauss_slope(t, s, sigma_d):
    """The true consistency function is f(x_t, t) = slope(t) x_t, slope = s / sqrt(Var(x_t))."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float64)
    return s / torch.sqrt(gauss_var_t(t, s, sigma_d))


def gauss_consistency_F(x, t, s, sigma_d):
    """The F whose (A5) is the true consistency function: cos t x_t - sin t sigma_d F = slope x_t."""
    tt = t.reshape((-1,) + (1,) * (x.dim() - 1))
    x_t = sigma_d * x
    return (torch.cos(tt) - gauss_slope(tt, s, sigma_d)) * x_t / (sigma_d * torch.sin(tt))


# ---------------------------------------------------------------------------------------------
# Gaussian mixture sum_k pi_k N(mu_k, s_k^2 I) in 2-D: the exact teacher F
# ---------------------------------------------------------------------------------------------
class MixtureTeacher(nn.Module):
    """F(x, t) = E[v_t | x_t] / sigma_d for mixture data, from the analytic posterior: given component k,
    x_t ~ N(cos t mu_k, V_k I), V_k = cos^2 t s_k^2 + sin^2 t sigma_d^2, and
    E[x0 | x_t, k] = mu_k + cos t s_k^2 (x_t - cos t mu_k) / V_k, E[z | x_t, k] = sin t sigma_d^2 (x_t - cos t mu_k) / V_k;
    the responsibilities are the softmax of log pi_k + log N(x_t; cos t mu_k, V_k I). Computed in float64."""

    def __init__(self, means, stds, weights, sigma_d):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("s", torch.as_tensor(stds, dtype=torch.float64))
        self.register_buffer("logpi", torch.log(torch.as_tensor(weights, dtype=torch.float64)))
        self.sigma_d = sigma_d

    def sample(self, n, generator=None):
        k = torch.multinomial(self.logpi.exp(), n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k, None] * torch.randn(n, self.mu.shape[1], generator=generator, dtype=torch.float64)

    def forward(self, x, t, **kw):
        sd = self.sigma_d
        dtype = x.dtype
        x_t = sd * x.double()
        tt = t.double().reshape(-1, 1, 1) * torch.ones(x.shape[0], 1, 1, dtype=torch.float64)  # (B, 1, 1)
        c, s_ = torch.cos(tt), torch.sin(tt)
        V = c**2 * self.s[None, :, None] ** 2 + s_**2 * sd**2  # (B, K, 1)
        r = x_t[:, None, :] - c * self.mu[None]  # (B, K, d)
        d = x.shape[1]
        logp = self.logpi[None] - 0.5 * (r**2).sum(-1) / V[..., 0] - 0.5 * d * torch.log(V[..., 0])
        w = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1)
        Ex0 = (w * (self.mu[None] + c * self.s[None, :, None] ** 2 * r / V)).sum(1)
        Ez = (w * (s_ * sd**2 * r / V)).sum(1)
        c1, s1 = c[:, 0], s_[:, 0]
        return ((c1 * Ez - s1 * Ex0) / sd).to(dtype)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (N, d): the mean over random
    unit directions of the W1 distance of the projections (sorted differences)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double() @ dirs, dim=0).values
    pb = torch.sort(b.double() @ dirs, dim=0).values
    return float((pa - pb).abs().mean())
