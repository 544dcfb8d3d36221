"""KernelSpec: one launchable configuration of a Triton kernel, as listed in each op's AOT_SPECS.

Kept apart from scm_kernels.aot (the compile driver) so that importing an op does not import the
driver; `python -m scm_kernels.aot` compiles every spec for sm_80 and sm_90.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One launchable configuration of a @triton.jit kernel."""

    op: str  # the op it belongs to, e.g. "trigflow_step"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> triton type: "*fp32", "*fp16", "*bf16", "*u8", "i32", "i64", "fp32", "constexpr"
    constexprs: dict  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 2
    expects_mma: bool = False  # True for kernels that must use tensor cores (tl.dot)
    archs: tuple | None = None  # the architectures (80, 90) whose launches use this config; None: all

    @property
    def kernel_name(self) -> str:
        return getattr(self.fn, "__name__", None) or self.fn.fn.__name__

    @property
    def config(self) -> str:
        ptr_types = "/".join(v[1:] for v in self.signature.values() if isinstance(v, str) and v.startswith("*"))
        parts = [f"ptrs={ptr_types}"] + [f"{k}={v}" for k, v in sorted(self.constexprs.items())]
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        return ",".join(parts)


def spec(op: str, fn, signature: dict, constexprs: dict, *, num_warps: int = 4, num_stages: int = 2,
         expects_mma: bool = False, archs=None) -> KernelSpec:
    return KernelSpec(op, fn, dict(signature), dict(constexprs), num_warps, num_stages, expects_mma,
                      None if archs is None else tuple(int(a) for a in archs))
