"""scm_kernels: fused ops with forward, backward and forward-mode JVP for continuous-time
consistency models (sCM). One public function per op; formulas labelled as in
shared/docs/algorithm.md. Backends: triton, cuda, cpu, reference (see scm_kernels.backend)."""

from scm_kernels.backend import available_backends, use_backend

__version__ = "0.1.0"

__all__ = ["available_backends", "use_backend", "__version__"]
