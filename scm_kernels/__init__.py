"""scm_kernels: fused ops with forward, backward and forward-mode JVP for continuous-time
consistency models (sCM). One public function per op; formulas labelled as in
shared/docs/algorithm.md. Backends: triton, cuda, cpu, reference (see scm_kernels.backend)."""

from scm_kernels.backend import available_backends, use_backend
from scm_kernels.attention import attention, attention_jvp
from scm_kernels.group_norm import group_norm
from scm_kernels.pixel_norm import pixel_norm
from scm_kernels.scm_loss import scm_loss
from scm_kernels.time_embedding import time_embedding
from scm_kernels.trigflow_step import trigflow_step

__version__ = "0.1.0"

__all__ = ["attention", "attention_jvp", "available_backends", "scm_loss", "time_embedding", "trigflow_step", "use_backend",
           "__version__"]
__all__ += ["group_norm", "pixel_norm"]
