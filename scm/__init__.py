"""scm: training and inference of continuous-time consistency models (sCT, sCD) on the fused ops of
scm_kernels. Formulas are labelled as in shared/docs/algorithm.md (A1...A30).

- scm.trigflow: the TrigFlow parameterization (A1-A9), EDM and flow-matching teachers as TrigFlow F.
- scm.losses: the TrigFlow diffusion loss (A4) and the sCT / sCD loss of Algorithm 1 (A12-A18).
- scm.sampling: consistency samplers (A20-A23) and teacher ODE samplers (DDIM A7, DPM-Solver-2, Heun).
- scm.networks: an EDM/ADM-style U-Net and a DiT on the fused ops (forward-mode JVP through every layer,
  per-layer forward_jvp), with presets from CPU demos to the paper's sizes.
- scm.config / scm.training: run configurations with presets, and the training loop (teacher, sCT, sCD;
  mixed precision, EMA and EDM2 power EMA, atomic checkpoints with exact resume, DDP via torchrun).
- scm.data / scm.metrics: datasets (embedded digits, image folders, .npz), FID with pluggable features.
- scm.checkpoint / scm.ema, and the `scm` command line (scm.cli) with `scm demo` (scm.demo).
Submodules that pull in optional work (training, data, metrics, cli, demo) are imported on use.
"""

from scm import losses, networks, sampling, trigflow
from scm.losses import AdaptiveWeighting, SCMLoss, SCMLossOutput, TrigFlowDiffusionLoss
from scm.networks import DiT, UNet
from scm.sampling import (ConsistencySamplerGraph, sample_consistency, sample_ddim, sample_dpm2, sample_heun,
                          sample_onestep, sample_twostep)
from scm.trigflow import TIME_PROPOSALS, TimeProposal, time_proposal

__version__ = "0.1.0"

__all__ = [
    "TIME_PROPOSALS", "AdaptiveWeighting", "ConsistencySamplerGraph", "DiT", "SCMLoss", "SCMLossOutput",
    "TimeProposal", "TrigFlowDiffusionLoss", "UNet", "__version__", "losses", "networks",
    "sample_consistency", "sample_ddim", "sample_dpm2", "sample_heun", "sample_onestep", "sample_twostep",
    "sampling", "time_proposal", "trigflow",
]
