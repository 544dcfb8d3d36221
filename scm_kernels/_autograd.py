"""Helpers shared by the autograd Functions of the ops."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def traceable(fn_cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function without its custom `jvp`, for torch.compile.

    Dynamo refuses to trace autograd Functions that define `jvp` ("Unsupported custom jvp"), and
    torch.compile does not trace forward-mode AD anyway; forward and backward are unchanged, so a
    compiled graph runs the same kernels (through their fake implementations while tracing)."""
    return type(fn_cls.__name__ + "Traceable", (fn_cls,), {"jvp": torch.autograd.Function.jvp,
                                                             "__doc__": traceable.__doc__})


def apply(fn_cls: type[torch.autograd.Function], traceable_cls: type[torch.autograd.Function], *args):
    """fn_cls.apply(*args) for positional arguments, without its per-call signature binding.

    torch.autograd.Function.apply binds the arguments with inspect.signature on every call when the
    Function uses setup_context (tens of microseconds, more than a small kernel). Our Functions take
    only positional arguments without defaults, so outside torch.func transforms and torch.compile
    this goes straight to the C++ apply that Function.apply ends in; inside them it is the usual
    apply (torch.compile: the jvp-free traceable_cls; a torch.func transform traced by torch.compile is
    refused with a RuntimeError)."""
    if torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active():
            # dynamo drops custom JVP rules (pytorch issue 192985): a traced torch.func.jvp returned a
            # zero tangent, silently. Eager transforms of a compiled model are fine (dynamo falls back).
            raise RuntimeError(
                f"scm_kernels ({fn_cls.__name__}): torch.func.jvp (or another torch.func transform) traced inside "
                "torch.compile is not supported: dynamo drops custom JVP rules (pytorch issue 192985) and would "
                "return wrong tangents. Call torch.func.jvp outside the compiled function.")
        return traceable_cls.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return fn_cls.apply(*args)
    args = torch._functorch.utils.unwrap_dead_wrappers(args)
    return super(torch.autograd.Function, fn_cls).apply(*args)  # the C++ _FunctionBase.apply


def backward_is_differentiated(ctx, *grads) -> bool:
    """Whether the backward of ctx's Function is itself differentiated, so that its results need a
    derivative of their own:
      * torch.func: a Jvp transform on the stack (torch.func.jvp over torch.func.grad: Hessian-vector
        products), or two Grad transforms (torch.func.grad of torch.func.grad);
      * plain autograd: a create_graph=True backward (grad mode is on inside it) of tensors that
        require grad (double backward, e.g. a gradient penalty), or forward_ad dual tensors among
        `grads` and the saved tensors.
    Not detected: a torch.func.vjp's vjp_fn differentiated by an enclosing transform (its own level
    has ended, so nothing on the stack tells); plain PyTorch with backend="reference" is exact there.
    The kernels detach their inputs and have no derivative of their own backward, so without this
    check that derivative would be lost: zero, silently, or a confusing error later. Cheap when none
    of these is active (the saved tensors are not unpacked)."""
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        keys = [i.key() for i in retrieve_all_functorch_interpreters()]
        return TransformType.Jvp in keys or keys.count(TransformType.Grad) >= 2
    if torch.is_grad_enabled():
        ts = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor)]
        # The vjp_fn of torch.func.vjp, called outside any transform, runs its backward with grad
        # mode on (create_graph = torch.is_grad_enabled()) over tensors of its finished level: a
        # first-order call, not a double backward.
        if not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts) and \
                any(t.requires_grad for t in ts):
            return True
    if fwAD._current_level >= 0:
        return any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None
                   for t in (*grads, *ctx.saved_tensors))
    return False
