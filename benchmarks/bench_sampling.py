"""Benchmark of sampling a batch of images: consistency sampling (1-step A21, 2-step A22, through the
fused scm_kernels.trigflow_step A23) against the teacher's ODE samplers (DPM-Solver-2 and EDM's Heun
in TrigFlow, scm.sampling) on the same network.

Variants (each its own case; one call = sampling one batch from fixed noise, under no_grad):
  1-step     scm.sample_onestep   times (T, 0), T = arctan(80 / sigma_d)        1 network evaluation
  2-step     scm.sample_twostep   times (T, 1.1, 0)                              2
  dpm2-<n>   scm.sample_dpm2      n steps of ode_times(n) (EDM's rho=7 grid)     2n - 1
  heun-<n>   scm.sample_heun      the same grid (only with SCM_BENCH_ODE=dpm2,heun) 2n - 1
n = 18 (EDM's CIFAR-10 setting, 35 evaluations; --quick: 4), SCM_BENCH_ODE_STEPS=<n> overrides;
SCM_BENCH_ODE=<comma-separated list of dpm2, heun> picks the ODE samplers (default dpm2).
The network's weights are its random initialization: the time of a sampler does not depend on them.

Images/s = batch / (ms / 1000): compare the variants' ms in the table (same batch, same network).

Providers:
  scm    the network on scm_kernels' automatic backend and the samplers' fused trigflow_step (what
         `scm` does by default)
  eager  the same sampler with model.set_backend("reference") and trigflow_step(backend="reference")
         (plain PyTorch for every fused op; Heun has no fused step, only its network differs)
  compile, copy  not measured (n/a rows)

Sizes: U-Net preset `demo-32` (3x32x32, 705,819 parameters), fp32, class-conditional, batch 8
(--quick: 4; CUDA 256 / 64): a few seconds per case on a CPU except the ODE sampler (~35 network
evaluations per call, 2 timed repeats). SCM_BENCH_BATCH=<n> and SCM_BENCH_NET=<preset> override (the same
variables as bench_train_step.py).

Minimal bytes: the noise (and class labels) read once + the images written once (GB/s is not
meaningful for a sampler: the network dominates).

No numeric target in issue 5 for sampling (it asks for the images/s of 1-step and 2-step against
the ODE sampler): TARGETS is empty.
"""

from __future__ import annotations

import functools
import os

import torch

from benchmarks.harness import Case, Target, env_batch, nbytes

OP = "sampling"
SEED = 0
SIGMA_D = 0.5
ODE_STEPS = 18

TARGETS: list[Target] = []


def net_name() -> str:
    return os.environ.get("SCM_BENCH_NET", "demo-32")


def batch_size(device: torch.device, quick: bool) -> int:
    """SCM_BENCH_BATCH if set, else 8 on CPU (4 with --quick), 256 on CUDA (64 with --quick)."""
    return env_batch(device, quick, cpu=(8, 4), cuda=(256, 64))


def ode_steps(quick: bool) -> int:
    env = os.environ.get("SCM_BENCH_ODE_STEPS")
    return int(env) if env else (4 if quick else ODE_STEPS)


def ode_samplers() -> list[str]:
    names = [s.strip() for s in os.environ.get("SCM_BENCH_ODE", "dpm2").split(",") if s.strip()]
    bad = [s for s in names if s not in ("dpm2", "heun")]
    if bad:
        raise ValueError(f"SCM_BENCH_ODE: unknown ODE samplers {bad}; expected dpm2, heun")
    return names


@functools.cache
def _network(net: str, backend: str | None, device: str):
    """The preset network in eval mode on `device` (same seed for every backend): shared by the cases."""
    import scm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = scm.networks.create(net).eval()
    model.set_backend(backend)
    return model.to(device)


class Sampler:
    """Samples one batch: kind "1-step", "2-step", "dpm2" or "heun" (with `steps` ODE steps), on the
    fused ops (backend None) or the reference ops (backend "reference")."""

    def __init__(self, net: str, kind: str, backend: str | None, steps: int = 0):
        self.net, self.kind, self.backend, self.steps = net, kind, backend, steps

    def __call__(self, noise, class_labels=None):
        import scm
        from scm.sampling import ode_times

        model = _network(self.net, self.backend, str(noise.device))
        kw = {"sigma_d": SIGMA_D}
        if class_labels is not None:
            kw["model_kwargs"] = {"class_labels": class_labels}
        if self.kind == "1-step":
            return scm.sample_onestep(model, noise, seed=SEED, backend=self.backend, **kw)
        if self.kind == "2-step":
            return scm.sample_twostep(model, noise, seed=SEED, backend=self.backend, **kw)
        times = ode_times(self.steps, SIGMA_D)
        if self.kind == "dpm2":
            return scm.sample_dpm2(model, noise, times, backend=self.backend, **kw)
        if self.kind == "heun":
            return scm.sample_heun(model, noise, times, **kw)
        raise ValueError(f"unknown sampler {self.kind!r}")


def _inputs(B: int, C: int, R: int, num_classes: int):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(SEED)
        out = {"noise": SIGMA_D * torch.randn(B, C, R, R, generator=g)}
        if num_classes:
            out["class_labels"] = torch.randint(0, num_classes, (B,), generator=g)
        return {k: v.to(device) for k, v in out.items()}

    return make


def _bytes(mode, i):
    return nbytes(*i.values()) + nbytes(i["noise"])  # inputs read once + images (noise-sized) written


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    from scm.networks import PRESETS

    net = net_name()
    cfg = PRESETS[net][1]
    C, R, K = cfg.get("in_channels", 3), cfg.get("img_resolution", 32), cfg.get("num_classes", 0)
    B, n = batch_size(device, quick), ode_steps(quick)
    samplers = [("1-step", "1-step", 0), ("2-step", "2-step", 0)]
    samplers += [(f"{k}-{n}", k, n) for k in ode_samplers()]
    out = []
    for variant, kind, steps in samplers:
        out.append(Case(
            op=OP, variant=variant, shape=(B, C, R, R), dtype=torch.float32, modes=("fwd",),
            make_inputs=_inputs(B, C, R, K), scm=Sampler(net, kind, None, steps),
            reference=Sampler(net, kind, "reference", steps), bytes=_bytes,
            unavailable={"compile": "torch.compile of a whole sampler is not measured",
                         "copy": "no copy baseline for a sampler"},
            # the ODE samplers take seconds per batch on a CPU
            max_repeats=(2 if steps else 10) if device.type == "cpu" else None,
        ))
    return out
