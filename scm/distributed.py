"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) of sCM networks through the
per-layer JVP path of scm.losses (A13).

    model = shard_model(model)                       # every block + the root, on the default group
    out = loss_fn(model, x0, step=..., jvp_model=model, ...)   # SCMLoss(jvp="layer")
    out.loss.backward(); opt.step()                  # FSDP2 reduce-scatters (averages) the grads

Why a wrapper is needed: FSDP2 all-gathers a sharded module's parameters in forward hooks of
``nn.Module.__call__``, but SCMLoss's no-grad JVP pass calls ``model.forward_jvp`` and every block's
``forward_jvp`` directly, so no hook fires and the blocks would see their parameter shards (DTensors).
`shard_model` replaces ``forward_jvp`` of every sharded block (and of the root) by a function that
gathers that module's parameters (``FSDPModule.unshard()``), runs the original ``forward_jvp`` and,
with ``reshard_after_forward=True``, frees them again (``reshard()``). The JVP pass therefore holds
the root group (embedding, stem, head: small) plus ONE block's full parameters at a time, like
FSDP2's own forward, and leaves everything sharded, as FSDP2 does after a no-grad forward (the
gradient pass gathers again). With ``reshard_after_forward=False`` every module stays gathered from
the JVP pass through the gradient pass until the backward reshards it (no second all-gather, the
whole model in memory), again like FSDP2's no-grad forward with that option: build the optimizer
from the sharded parameters BEFORE any such pass (parameters() of a gathered module are the full,
temporary tensors), and call `reshard_all` after a standalone no-grad pass (sampling, evaluation).

Whole-model ``torch.func.jvp`` (SCMLoss(jvp="func")) over a sharded model also runs on torch 2.13
(FSDP2's hooks step out of functorch for their collectives; checked against the unsharded model by
tests/scm/test_fsdp.py), but gathers through the same hooks as a forward; the per-layer path is the
one this module is for.

Checkpoints: the sharded model's state_dict() holds DTensors; `full_state_dict` gathers plain
tensors (a collective: every rank calls it) and `load_full_state_dict` loads a plain state dict into
the shards; `gather_full` gathers any nested state (optimizer, EMA) and
`load_full_optimizer_state_dict` loads a full optimizer state into the shards. The gathered states
have the layout of an unsharded run's (weights_only-loadable). An EMA copy is sharded the same way:
build it from the unsharded model, then shard_model(ema_module) too; the elementwise EMA updates
then run on the local shards.

Gradient norms: `grad_norm` and `clip_grad_norm_` (collectives) take sharded and plain parameters
together (w_phi stays unsharded, outside the model); torch's clip_grad_norm_ refuses that mix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["clip_grad_norm_", "default_block_types", "full_state_dict", "gather_full", "grad_norm",
           "is_sharded", "load_full_optimizer_state_dict", "load_full_state_dict", "reshard_all",
           "shard_model"]

_WRAPPED = "_scm_fsdp_forward_jvp"  # marks a forward_jvp replaced by shard_model (holds the original)


def default_block_types() -> tuple[type, ...]:
    """The block classes of scm.networks that shard_model shards one by one: ResBlock,
    AttentionBlock (U-Net) and DiTBlock."""
    from scm.networks.dit import DiTBlock
    from scm.networks.layers import AttentionBlock, ResBlock
    return (ResBlock, AttentionBlock, DiTBlock)


def is_sharded(model: nn.Module) -> bool:
    """True when `model` went through fully_shard (FSDP2)."""
    return isinstance(model, FSDPModule)


def _gathered_jvp(module: FSDPModule, original, reshard: bool, root: bool):
    @functools.wraps(original)
    def forward_jvp(*args, **kwargs):
        if root:
            # FSDP2 finds its root and shares its communication state on the root's first forward
            # (lazy init). The JVP pass may come first (SCMLoss runs it before the gradient pass):
            # run the same initialization here. Idempotent. Private API of torch 2.x FSDP2.
            module._get_fsdp_state()._lazy_init()
        module.unshard()
        try:
            return original(*args, **kwargs)
        finally:
            if reshard:
                module.reshard()
    setattr(forward_jvp, _WRAPPED, original)
    return forward_jvp


def shard_model(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True,
                block_types: Iterable[type] | None = None) -> nn.Module:
    """Shard `model` with FSDP2 for sCM training on the per-layer JVP path; returns the model (the
    same object, its class swapped by fully_shard, as FSDP2 does).

    fully_shard is applied to every submodule whose type is in `block_types` (default
    `default_block_types()`), then to the root (the remaining parameters: embeddings, stem, head).
    Every sharded module that has ``forward_jvp`` gets it wrapped so that its parameters are
    gathered for its JVP and, when `reshard_after_forward`, freed right after (the root group plus one
    block at a time). Without `reshard_after_forward` they stay gathered until the next backward (or
    `reshard_all`); see the module docstring.

    Args:
        mesh: a 1-D DeviceMesh (None: the default process group on the parameters' device type).
        reshard_after_forward: FSDP2's option, also applied to the JVP pass.
        block_types: classes to shard one by one (nested ones are sharded with their outer block).
    Mixed precision: use autocast (as scm.training does), not FSDP2's MixedPrecisionPolicy: FSDP2
    casts a module's inputs in its forward hooks, which the per-layer JVP pass does not go through.
    Channels-last networks (UNet(channels_last=True)): FSDP2 shards contiguous parameters only, so the
    convolution weights are made contiguous (NCHW) first; the feature maps stay channels-last.
    The process group must be initialized (torchrun; gloo on CPU, nccl on GPUs). Every rank must call
    shard_model on identical models (same seed) and then run the same forwards (collectives)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("scm.distributed.shard_model: torch.distributed is not initialized; launch with "
                           "torchrun and call torch.distributed.init_process_group first")
    if is_sharded(model):
        raise ValueError("scm.distributed.shard_model: the model is already sharded")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"scm.distributed.shard_model: reshard_after_forward must be a bool, got "
                        f"{reshard_after_forward!r}")
    types = tuple(block_types) if block_types is not None else default_block_types()
    with torch.no_grad():  # FSDP2: "does not support non-contiguous parameters" (channels-last weights)
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    kw = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kw["mesh"] = mesh

    # The outermost blocks (a block nested in another is sharded with it).
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, mod in model.named_modules():
        if mod is model or id(mod) in inside:
            continue
        if isinstance(mod, types):
            blocks.append(mod)
            inside.update(id(m) for m in mod.modules())
    if not blocks:
        raise ValueError(f"scm.distributed.shard_model: no submodule of {type(model).__name__} is one of "
                         f"{[t.__name__ for t in types]}; pass block_types=")
    for blk in blocks:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)

    for mod in blocks + [model]:
        original = getattr(mod, "forward_jvp", None)
        if original is None:
            continue
        mod.forward_jvp = _gathered_jvp(mod, original, reshard=reshard_after_forward, root=mod is model)
    return model


def reshard_all(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module under `model` (back to their shards): after
    a no-grad pass with reshard_after_forward=False that no backward follows. No communication."""
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


# ---------------------------------------------------------------------------------------------
# State dicts and gradient norms across sharded and plain parameters
# ---------------------------------------------------------------------------------------------
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every DTensor gathered to a plain CPU tensor (`gather_full`). A
    collective: every rank must call it."""
    return gather_full(model.state_dict())


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Load a plain (full) state dict into a sharded model: every rank holds `state` and keeps its
    own shard of each tensor (no communication). Returns load_state_dict's result."""
    own = model.state_dict()
    conv = {}
    for k, v in state.items():
        ref = own.get(k)
        if isinstance(ref, DTensor):
            v = distribute_tensor(v.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                                  src_data_rank=None)
        conv[k] = v
    return model.load_state_dict(conv, strict=strict)


def gather_full(obj):
    """`obj` (a state dict, or nested dicts / lists / tuples of tensors, e.g. optimizer.state_dict()
    or EMA.state_dict() of sharded modules) with every DTensor gathered into a full tensor and every
    tensor cloned to the CPU; other values unchanged. A collective: every rank must call it on
    structures of the same layout. The result has the layout of the unsharded objects' state dicts
    (optimizer states keyed by parameter index), so checkpoints of sharded and unsharded runs are
    interchangeable."""
    if isinstance(obj, DTensor):
        obj = obj.full_tensor()
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v) for v in obj)
    return obj


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (``gather_full(optimizer.state_dict())`` of the sharded run, or the
    state dict of an unsharded one; every rank holds it) into an optimizer over sharded (DTensor) and
    plain parameters: every state tensor of a sharded parameter's shape is cut to this rank's shard
    (no communication)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            st = optimizer.state[p]
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(device=p.device), p.device_mesh, p.placements,
                                              src_data_rank=None)


def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Global gradient norm of `params`, sharded (DTensor: the shards' norms reduced across ranks) and
    plain (taken as they are: replicate them, e.g. w_phi with its gradients all-reduced) together.
    A collective when any gradient is a DTensor. Returns a plain 0-d float32 tensor."""
    norm_type = float(norm_type)
    parts = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        n = torch.linalg.vector_norm(g.to(torch.float32), norm_type)
        parts.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if not parts:
        return torch.zeros(())
    stacked = torch.stack([p.to(parts[0].device) for p in parts])
    if math.isinf(norm_type):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, norm_type)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a mix of sharded (DTensor) and plain parameters, which
    torch's refuses ("mixed torch.Tensor and DTensor"): scales every gradient by
    min(1, max_norm / (total + 1e-6)) and returns the total norm (`grad_norm`; a collective). A
    non-finite norm leaves the gradients as they are (the caller skips the step)."""
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, norm_type)
    if torch.isfinite(total):
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.device))
    return total
