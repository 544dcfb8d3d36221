"""Plain-PyTorch reference of trigflow_step (A23): the oracle of the tests and the `reference` backend.

    x0  = cos t * x_t - sin t * sigma_d * F                  (A5, the consistency function)
    out = cos s * x0  + sin s * sigma_d * eps    (s = t_next) (A22/A23, renoise)
    pixels = round(clamp((x0 + 1) * 127.5, 0, 255))           (A23, last step, round half to even)

eps is `noise` when given, else the counter-based Philox4x32-10 + Box-Muller stream keyed by `seed`
(csrc/include/scm/math.h, philox_normal): element i = b*D + k of sample b, k the memory-order index
of the element inside its sample, D elements per sample; group g = i // 4, lane i % 4. The uint32
arithmetic of Philox is emulated exactly in int64 (multiplications split into 16-bit halves so that
nothing overflows), so this reference draws bit-identical uniforms to the kernels; only the float
rounding of log/cos/sin may differ.
"""

from __future__ import annotations

import math
import numbers

import torch

from scm_kernels import _layout

# Philox4x32-10 constants (Salmon et al., SC'11), as in scm/math.h.
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF
_TWO_PI_F32 = 6.283185307179586  # rounded to float32 where the stream is drawn in float32


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * x for a uint32 constant a and an int64
    tensor x holding uint32 values. a = ah * 2^16 + al, so both partial products stay below 2^48."""
    al, ah = a & 0xFFFF, a >> 16
    p_l = x * al
    s = x * ah + (p_l >> 16)  # < 2^49; a * x = s * 2^16 + (p_l & 0xFFFF)
    hi = s >> 16
    lo = ((s & 0xFFFF) << 16) | (p_l & 0xFFFF)
    return hi, lo


def philox4x32_10(g: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (lo32(g), hi32(g), 0, 0) under key (lo32(seed), hi32(seed)).

    g: int64 tensor of group indices (>= 0). Returns four int64 tensors holding uint32 values."""
    c0 = g & _M32
    c1 = g >> 32
    c2 = torch.zeros_like(g)
    c3 = torch.zeros_like(g)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_ROUND_A, c0)
        hi2, lo2 = _mulhilo32(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uint_to_unit(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """u = ((r >> 8) + 0.5) * 2^-24: exact in float32, strictly inside (0, 1)."""
    return ((r >> 8).to(dtype) + 0.5) * 2.0**-24


def philox_normal(seed: int, B: int, D: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B, D) standard normals of the stream keyed by `seed` (scm::philox_normal, A23).

    dtype float32 follows the kernels' float32 arithmetic; float64 gives the oracle (the same
    uniforms, Box-Muller evaluated in float64)."""
    n = B * D
    groups = (n + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    r0, r1, r2, r3 = philox4x32_10(g, int(seed))
    u0, u1, u2, u3 = (_uint_to_unit(r, dtype) for r in (r0, r1, r2, r3))
    two_pi = _TWO_PI_F32 if dtype != torch.float64 else 2.0 * math.pi
    ra = torch.sqrt(-2.0 * torch.log(u0))
    rb = torch.sqrt(-2.0 * torch.log(u2))
    ta = u1 * two_pi
    tb = u3 * two_pi
    out = torch.stack([ra * torch.cos(ta), ra * torch.sin(ta), rb * torch.cos(tb), rb * torch.sin(tb)], dim=1)
    return out.reshape(-1)[:n].reshape(B, D)


def philox_noise_like(x_t: torch.Tensor, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise shaped like x_t, element k of sample b taken from stream index b*D + k in the memory
    order of x_t's samples (the order the kernels see; a copy of x_t is contiguous)."""
    base = _layout.dense_base(x_t)
    out = _layout.empty_like_rows(base, dtype)
    _layout.as_rows(out).copy_(philox_normal(seed, x_t.shape[0], _layout.sample_numel(x_t), x_t.device, dtype))
    return out


def to_pixel(x0: torch.Tensor) -> torch.Tensor:
    """uint8 pixels round(clamp((x0 + 1) * 127.5, 0, 255)) (A23; torch.round: half to even)."""
    return torch.round(torch.clamp((x0 + 1) * 127.5, 0, 255)).to(torch.uint8)


def _time(t, x: torch.Tensor) -> torch.Tensor:
    """A per-sample time as a tensor broadcasting against x: (B, 1, ..., 1), or a 0-d tensor."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            return t.reshape(())
        return t.reshape((x.shape[0],) + (1,) * (x.dim() - 1))
    if not isinstance(t, numbers.Real):
        raise TypeError(f"time must be a number or a tensor, got {type(t).__name__}")
    return torch.tensor(float(t), dtype=x.dtype, device=x.device)


def trigflow_step(x_t: torch.Tensor, F: torch.Tensor, t, sigma_d: float = 0.5, t_next=None,
                  noise: torch.Tensor | None = None, seed: int | None = None,
                  out_uint8: bool = False) -> torch.Tensor:
    """Fused sampler step (A23) in plain PyTorch, computed in the inputs' dtypes (type promotion;
    uint8 pixels from an x0 in at least float32), returned in x_t's dtype (or uint8 pixels). With
    t_next and neither noise nor seed, eps is drawn from torch's default generator through a Philox
    seed, like the public op."""
    # Explicit promotion: with a number t the cos/sin factors are 0-d tensors, which do not take part
    # in type promotion, so sin t * sigma_d * F would run in F's dtype (bf16 F with fp32 x_t: the F
    # term rounded to 8 bits) instead of the promoted one.
    # Pixels come from x0 in at least float32, as the kernels compute it (one 8-bit pixel step is about
    # bf16's rounding of x0: pixels of a bf16 x0 are off by one).
    dt = torch.promote_types(x_t.dtype, F.dtype)
    pixels = out_uint8 and t_next is None
    if pixels:
        dt = torch.promote_types(dt, torch.float32)
    x = x_t.to(dt)
    tt = _time(t, x)
    if pixels:
        tt = tt.to(torch.promote_types(tt.dtype, dt))
    x0 = torch.cos(tt) * x - torch.sin(tt) * sigma_d * F.to(dt)  # (A5)
    if t_next is None:
        if out_uint8:
            return to_pixel(x0)
        return x0.to(x_t.dtype)
    if noise is None:
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()))
        noise = philox_noise_like(x_t, seed, torch.float64 if x_t.dtype == torch.float64 else torch.float32)
    ss = _time(t_next, x_t)
    dt = torch.promote_types(x0.dtype, noise.dtype)
    out = torch.cos(ss) * x0.to(dt) + torch.sin(ss) * sigma_d * noise.to(dt)  # (A22/A23)
    return out.to(x_t.dtype)
