"""scm: training and inference of continuous-time consistency models (sCT, sCD) on the fused ops of
scm_kernels. The TrigFlow utilities, losses, networks, samplers and the training loop are built in
later stages (see the project's issues); this package currently holds only its version."""

__version__ = "0.1.0"
