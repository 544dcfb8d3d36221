"""Benchmark of one sCT training step (Algorithm 1, A12-A17) of a demo-size U-Net with attention.

One call = one whole step of `scm.SCMLoss` on a fixed batch: the forward-mode pass (F^-, J) (A13)
and the gradient pass F -- merged into one pass with grad enabled (F^- = F.detach()) where SCMLoss's
default passes="auto" merges them, i.e. for the scm and eager providers (the U-Net on the per-layer
path); two passes for func-sdpa-math (whole-model torch.func.jvp) -- the fused loss (A14-A17),
loss.backward() and an Adam step over the U-Net and the adaptive weighting w_phi. The harness's
mode `fwd` is used for it: the timed callable enables grad itself (the harness wraps `fwd` in
no_grad), so the table's `fwd` row IS the training step; the other modes do not apply.

Providers (each its own model, optimizer and loss, built on the first call with the same seed, so
the first step of every provider starts from the same weights and gives the same loss):
  scm             fused ops: the network and the loss on scm_kernels' automatic backend (CPU: the C++
                  kernels; CUDA: Triton), per-layer JVP path (UNet.forward_jvp, attention through
                  scm_kernels.attention_jvp) -- what `scm` does by default; channels-last on CPU
                  (see Layout)
  eager           reference ops: the same step with model.set_backend("reference") and
                  SCMLoss(backend="reference") (plain PyTorch for every fused op), same JVP path and
                  passes. (Its merged pass is faster than its separate passes but holds much more
                  memory: torch.func.jvp over the decomposed reference ops records the primal's
                  backward in decomposed form. SCM_BENCH_PASSES=separate runs both providers with
                  two passes.) Its attention is softmax(q k^T) v written out in PyTorch (the N x N
                  matrix is materialized as in math attention) but it is not torch's SDPA.
  func-sdpa-math  torch.func.jvp over the whole model (SCMLoss(jvp="func")), reference ops, and the
                  attention swapped for torch's F.scaled_dot_product_attention under
                  sdpa_kernel(SDPBackend.MATH) (the path torch.func.jvp needs: the fused SDPA
                  backends have no forward-mode rule) -- what one writes without scm_kernels
  compile, copy   not measured (a torch.compile of a whole step with torch.func.jvp and an optimizer
                  is not a baseline here; no copy baseline for a training step): n/a rows

Sizes: U-Net preset `demo-32` (3x32x32, ch 24, mult 1,2,2, attention at 8x8, 10 classes, 705,819
parameters), fp32, batch 16 (--quick: 8; CUDA 64 / 16). Environment overrides:
SCM_BENCH_BATCH=64 (the issue's CPU target batch), SCM_BENCH_NET=<preset of scm.networks>,
SCM_BENCH_PASSES=auto|merged|separate (SCMLoss's passes, default auto) and
SCM_BENCH_LAYOUT=best|nchw|channels_last (the U-Net's memory layout, UNet(channels_last=...)).

Layout: "best" (default) runs each provider in its faster layout on this CPU: channels-last for the
fused ops (oneDNN convolutions are faster on NHWC maps, and the fused group_norm and attention keep
that layout), NCHW for the reference ops (torch.func.jvp of F.group_norm cannot take channels-last
tensors, so the reference group_norm copies to NCHW and back: slower there). The reference's
number is thus its best, not a handicapped one; the nchw and channels_last settings compare the
two in one layout. On CUDA "best" is NCHW for both (not measured there).

Step settings: Adam (lr 1e-4), SCMLoss defaults (CIFAR-10 proposal, adaptive weighting, c = 0.1)
with the tangent warmup off (r = 1; the same work as any r), fixed t and z per call.

Time: median of the repeats as usual (the repeats are capped: a step takes ~0.1-2 s on a CPU). On a
CPU shared with other processes, OMP_NUM_THREADS=1 gives steadier numbers: with more OpenMP threads
than free cores the many short parallel regions of a step wait on descheduled threads (seen here:
10x-50x slower steps at 2 threads under a load of 5 on 2 cores).
Peak memory: with `--memory`, the peak-RSS increase of the process during one step after a warm-up
step, in a fresh subprocess per provider (harness.rss_peak_increase_mb): everything the step holds
at its high-water mark beyond what was resident before it -- activations saved for backward, the
JVP pass's primal and tangent temporaries, gradients (zeroed with set_to_none, so reallocated each
step); the weights and Adam's moments already exist after the warm-up and are not counted. Without
`--memory` the mem column is only the analytic batch bytes (marked *) and the memory target is
SKIPped. RSS counts every page the step touches (also malloc's slack); a cross-check that counts
tensor bytes only is `python -m benchmarks.bench_train_step`: the peak of live tensor bytes during
one step from the profiler's allocation events (tensor_peak_mb), per provider.

Minimal bytes (meaningless as bandwidth here, kept for the harness's columns): the batch read once
(x0, class labels, t, z) + the scalar loss written.

Targets (issue 5, CPU, fp32, batch 64): the fused step >= 1.5x faster than the reference-ops step,
and <= 0.7x its peak memory. They are checked at whatever batch runs (the TARGETS line shows the
shape); the issue's condition is SCM_BENCH_BATCH=64.
"""

from __future__ import annotations

import contextlib
import os

import torch

from benchmarks.harness import Baseline, Case, Target, env_batch, nbytes

OP = "train_step"
BASELINES = ("func-sdpa-math",)
VARIANT = "sct"
SEED = 0
SIGMA_D = 0.5
LR = 1e-4  # small: the timed steps keep training the same weights, far from diverging

TARGETS = [
    Target(f"{OP} sct fp32: fused step >= 1.5x faster than reference ops (issue: CPU, batch 64)", VARIANT,
           "fwd", "fp32", "x_eager", 1.5),
    Target(f"{OP} sct fp32: fused step peak memory <= 0.7x reference ops' (issue: CPU, batch 64; --memory)",
           VARIANT, "fwd", "fp32", "memory", 1 / 0.7, baseline="eager"),
]


def net_name() -> str:
    return os.environ.get("SCM_BENCH_NET", "demo-32")


def channels_last_for(provider: str, device: torch.device) -> bool:
    """The U-Net's layout for a provider ("scm" or "reference"): SCM_BENCH_LAYOUT=nchw or channels_last
    for all; "best" (default): each provider in its faster layout on this CPU -- channels-last for the
    fused ops, NCHW for the reference ops -- and NCHW for all on CUDA (not measured there)."""
    layout = os.environ.get("SCM_BENCH_LAYOUT", "best")
    if layout not in ("best", "nchw", "channels_last"):
        raise ValueError(f"SCM_BENCH_LAYOUT must be best, nchw or channels_last, got {layout!r}")
    if layout == "best":
        return provider == "scm" and device.type == "cpu"
    return layout == "channels_last"


def batch_size(device: torch.device, quick: bool) -> int:
    """SCM_BENCH_BATCH if set, else 16 on CPU (8 with --quick), 64 on CUDA (16 with --quick)."""
    return env_batch(device, quick, cpu=(16, 8), cuda=(64, 16))


@contextlib.contextmanager
def math_sdpa_attention():
    """Route scm_kernels.nn.Attention through torch's F.scaled_dot_product_attention with the MATH
    backend (differentiable in forward mode by torch's decomposition) for the duration."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import scm_kernels.nn.attention as attn_mod

    def sdpa_math(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, backend=None,
                  precision=None):
        del backend, precision
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                  scale=scale, enable_gqa=enable_gqa)

    original = attn_mod.attention
    attn_mod.attention = sdpa_math
    try:
        yield
    finally:
        attn_mod.attention = original


class TrainStep:
    """One provider's training state (model, SCMLoss, Adam), built on the first call on the batch's
    device with a fixed seed; each call is one sCT step on the given batch and returns the loss.

    backend: None (fused ops, automatic) or "reference"; jvp: SCMLoss's JVP path; sdpa_math: the
    attention through torch's math SDPA (see math_sdpa_attention)."""

    def __init__(self, net: str, backend: str | None, jvp: str = "auto", sdpa_math: bool = False,
                 channels_last: bool | None = None):
        self.net, self.backend, self.jvp, self.sdpa_math = net, backend, jvp, sdpa_math
        self.channels_last = channels_last  # None: channels_last_for(provider, device) at the first call
        self.state = None
        self.steps = 0

    def _build(self, device: torch.device):
        import scm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            cl = self.channels_last
            if cl is None:
                cl = channels_last_for("scm" if self.backend is None else "reference", device)
            model = scm.networks.create(self.net, channels_last=cl).train()
            loss_fn = scm.SCMLoss(sigma_d=SIGMA_D, warmup_steps=0, jvp=self.jvp, backend=self.backend,
                                  passes=os.environ.get("SCM_BENCH_PASSES", "auto"))
        model.set_backend(self.backend)
        model.to(device)
        loss_fn.to(device)
        opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=LR)
        return model, loss_fn, opt

    def __call__(self, x0, t, z, class_labels=None):
        if self.state is None or next(self.state[0].parameters()).device != x0.device:
            self.state = self._build(x0.device)
        model, loss_fn, opt = self.state
        kw = {} if class_labels is None else {"class_labels": class_labels}
        attn = math_sdpa_attention() if self.sdpa_math else contextlib.nullcontext()
        with torch.enable_grad(), attn:
            out = loss_fn(model, x0, model_kwargs=kw, t=t, z=z)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        self.steps += 1
        return out.loss.detach()


def _inputs(B: int, C: int, R: int, num_classes: int):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(SEED)
        x0 = SIGMA_D * torch.randn(B, C, R, R, generator=g)
        z = SIGMA_D * torch.randn(B, C, R, R, generator=g)
        # times from the CIFAR-10 proposal (A9): log(sigma_d tan t) ~ N(-1.0, 1.4^2)
        sigma = torch.exp(-1.0 + 1.4 * torch.randn(B, generator=g, dtype=torch.float64))
        t = torch.atan(sigma / SIGMA_D).float()
        out = {"x0": x0, "t": t, "z": z}
        if num_classes:
            out["class_labels"] = torch.randint(0, num_classes, (B,), generator=g)
        return {k: v.to(device) for k, v in out.items()}

    return make


def _bytes(mode, i):
    return nbytes(*i.values()) + 4  # the batch read once + the fp32 scalar loss written


def tensor_peak_mb(fn) -> float:
    """Peak of the live tensor bytes (MB) allocated by torch's CPU allocator during one call of fn,
    relative to the start of the call, from torch.profiler's memory events (profile_memory=True):
    the allocations and frees in time order, summed. Call fn once before (warm-up). Frees of blocks
    allocated before the profiler started are not reported by it (torch warns), so the peak is an upper
    bound by at most those (here the previous step's gradients, freed by zero_grad(set_to_none))."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nb in events:
        live += nb
        peak = max(peak, live)
    return peak / 1e6


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    from scm.networks import PRESETS

    net = net_name()
    cfg = PRESETS[net][1]
    C, R, K = cfg.get("in_channels", 3), cfg.get("img_resolution", 32), cfg.get("num_classes", 0)
    B = batch_size(device, quick)
    return [Case(
        op=OP, variant=VARIANT, shape=(B, C, R, R), dtype=torch.float32, modes=("fwd",),
        make_inputs=_inputs(B, C, R, K),
        scm=TrainStep(net, None), reference=TrainStep(net, "reference"), bytes=_bytes,
        baselines={"func-sdpa-math": Baseline(TrainStep(net, "reference", jvp="func", sdpa_math=True),
                                              modes=("fwd",), backend="reference+math-sdpa")},
        unavailable={"compile": "torch.compile of a whole sCT step (torch.func.jvp + optimizer) is not "
                                "measured",
                     "copy": "no copy baseline for a training step"},
        max_repeats=3 if device.type == "cpu" else None,
    )]


def main() -> None:
    """Peak tensor memory of one step per provider (profiler events; see tensor_peak_mb), CPU."""
    device = torch.device("cpu")
    (case,) = cases(device)
    inputs = case.make_inputs(device)
    print(f"{OP} {case.variant} {case.shape_str} fp32, {torch.get_num_threads()} threads: peak live tensor "
          "memory during one step (after a warm-up step), from torch.profiler memory events")
    peaks = {}
    for name, fn in (("scm", case.scm), ("eager", case.reference),
                     ("func-sdpa-math", case.baselines["func-sdpa-math"].fn)):
        fn(**inputs)
        peaks[name] = tensor_peak_mb(lambda fn=fn: fn(**inputs))
        print(f"  {name:15s} {peaks[name]:9.1f} MB", flush=True)
    print(f"  eager / scm = {peaks['eager'] / peaks['scm']:.2f}x (issue target >= {1 / 0.7:.2f}x); "
          f"func-sdpa-math / scm = {peaks['func-sdpa-math'] / peaks['scm']:.2f}x")


if __name__ == "__main__":
    main()
