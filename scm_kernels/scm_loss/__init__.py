"""The sCM training loss (A14-A17) as one fused op with backward and forward-mode JVP.

Per sample b (D = elements per sample, ct = cos t_b, st = sin t_b):

    (A14)  g  = -ct^2 * (sigma_d * F^- - dx_t/dt) - r * (ct * st * x_t + sigma_d * J)
    (A16)  g^ = g / (||g||_2 + c)
    (A17)  L_b = exp(-logvar_b) / D * ||F - F^- - g^||^2 + logvar_b     (logvar None: ||.||^2 / D)

F is F_theta (it carries the gradient); F^- = F_minus, by default F.detach() (then the kernels
read F in its place); J = jvp_out is the rearranged tangent of (A13); r is the tangent warmup
factor (A15); c the normalization constant of (A16).

Derivatives: the gradient flows to F and logvar only. F_minus, jvp_out, x_t, dxt_dt and t are the
theta^- side of Algorithm 1 (stop-gradient by definition): they get no gradient and no tangent,
whatever their requires_grad (they are detached). loss.backward(), torch.func.jvp and
torch.autograd.forward_ad all work (tangents of F and logvar).

Layouts: inputs may be contiguous, batch slices (x[::2]), channels_last or broadcast over the batch
(expanded) without copies; an operand whose inner layout differs from F's is copied once into F's
layout. Dtypes may differ between operands (bf16 F/J with fp32 x_t is normal); every kernel
accumulates in fp32 and the loss is float32. The Triton backend accepts F, jvp_out, F_minus of one
dtype and x_t, dxt_dt of one dtype (each fp32/fp16/bf16, or all fp64; the `cpu` and `cuda` backends
take any mix).
"""

from __future__ import annotations

import torch

from scm_kernels import _checks, _layout, backend as _backend
from scm_kernels.scm_loss import reference
from scm_kernels.scm_loss.function import ScmLossFunction
from scm_kernels.scm_loss.triton_kernels import DTYPE_GROUPS
from scm_kernels import _autograd

_ScmLossTraceable = _autograd.traceable(ScmLossFunction)  # the Function as torch.compile traces it

OP = "scm_kernels.scm_loss"

__all__ = ["scm_loss", "ScmLossFunction"]


def _check_triton(F, J, x_t, dxt_dt, F_minus) -> None:
    """The dtype groups and sizes the Triton kernels are compiled for (see triton_kernels)."""
    net = {F.dtype, J.dtype} | ({F_minus.dtype} if F_minus is not None else set())
    data = {x_t.dtype, dxt_dt.dtype}
    if len(net) != 1 or len(data) != 1 or (F.dtype, x_t.dtype) not in DTYPE_GROUPS:
        got = (f"F {F.dtype}, jvp_out {J.dtype}" + (f", F_minus {F_minus.dtype}" if F_minus is not None else "")
               + f", x_t {x_t.dtype}, dxt_dt {dxt_dt.dtype}")
        raise TypeError(f"{OP}: backend 'triton' needs F, jvp_out and F_minus of one dtype and x_t, dxt_dt of one "
                        "dtype (each float32, float16 or bfloat16, or all float64); got " + got +
                        ". Cast them, or use backend='cpu'/'cuda' which take any mix.")
    D = _layout.sample_numel(F)
    if D >= 2**31:
        raise ValueError(f"{OP}: backend 'triton' needs fewer than 2^31 elements per sample, got {D}")


def scm_loss(
    F: torch.Tensor,
    jvp_out: torch.Tensor,
    x_t: torch.Tensor,
    dxt_dt: torch.Tensor,
    t: torch.Tensor | float,
    logvar: torch.Tensor | None = None,
    *,
    F_minus: torch.Tensor | None = None,
    sigma_d: float = 0.5,
    r: float = 1.0,
    c: float = 0.1,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sample sCM loss (A14)-(A17), shape (B,), float32.

    Args:
        F: (B, ...) F_theta(x_t / sigma_d, c_noise(t)), any float dtype; carries the gradient.
        jvp_out: J of (A13), same shape as F (stop-gradient).
        x_t: (A1) noisy sample, same shape (stop-gradient).
        dxt_dt: (A12) tangent of the data path, same shape (stop-gradient).
        t: per-sample time: a number, or a tensor of shape (B,), (B, 1, ..., 1) or one element.
        logvar: adaptive weight (A17), a tensor of B elements ((B,) or (B, 1, ...), e.g. the (B, 1)
            output of w_phi), any float dtype; receives a gradient in its own dtype and shape.
            None: weight 1 and no logvar term.
        F_minus: F^- of (A14)/(A17), same shape as F; default F.detach() (stop-gradient).
        sigma_d: data standard deviation, > 0.
        r: tangent warmup factor (A15), finite, >= 0.
        c: normalization constant (A16), > 0.
        backend: "triton", "cuda", "cpu", "reference" or None (automatic, see scm_kernels.backend).
    """
    # 1. validation, before any kernel
    F = _checks.tensor(F, "F", OP, min_ndim=1)
    J = _checks.tensor(jvp_out, "jvp_out", OP)
    x_t = _checks.tensor(x_t, "x_t", OP)
    dxt_dt = _checks.tensor(dxt_dt, "dxt_dt", OP)
    if F_minus is not None:
        F_minus = _checks.tensor(F_minus, "F_minus", OP)
    _checks.same_device(OP, "F", F, jvp_out=J, x_t=x_t, dxt_dt=dxt_dt, F_minus=F_minus)
    _checks.same_shape(OP, "F", F, jvp_out=J, x_t=x_t, dxt_dt=dxt_dt, F_minus=F_minus)
    B = F.shape[0]
    if logvar is not None:
        _checks.tensor(logvar, "logvar", OP)
        _checks.same_device(OP, "F", F, logvar=logvar)
        if logvar.dim() < 1 or logvar.shape[0] != B or logvar.numel() != B:
            raise ValueError(f"{OP}: logvar must hold one value per sample, shape ({B},) or ({B}, 1, ...); "
                             f"got shape {tuple(logvar.shape)}")
    sigma_d = _checks.number(sigma_d, "sigma_d", OP, positive=True)
    r = _checks.number(r, "r", OP, nonneg=True)
    c = _checks.number(c, "c", OP, positive=True)
    t32 = _checks.per_sample(t.detach() if isinstance(t, torch.Tensor) else t, "t", OP, B, F)

    # 2. backend
    name = _backend.select(F.device, backend, op=OP)

    # 3. reference: plain PyTorch differentiates itself
    if name == "reference":
        out = reference.scm_loss(F, J, x_t, dxt_dt, t, logvar, F_minus, sigma_d, r, c)
        return out.to(torch.float32)

    if name == "triton":
        _check_triton(F, J, x_t, dxt_dt, F_minus)

    # 4. kernel backends: (B, D) views in F's inner layout, stop-gradient operands detached
    Fd = _layout.dense_base(F)

    def rows(x):
        return _layout.as_rows(_layout.matched(Fd, x.detach()))

    lv32 = logvar.reshape(B).to(torch.float32) if logvar is not None else None
    loss, _, _ = _autograd.apply(ScmLossFunction, _ScmLossTraceable,
        Fd, lv32, rows(J), rows(x_t), rows(dxt_dt), t32, rows(F_minus) if F_minus is not None else None,
        sigma_d, r, c, name,
    )
    return loss
