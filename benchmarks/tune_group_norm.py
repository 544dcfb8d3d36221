"""Sweep the tiles of the Triton GroupNorm kernels on this GPU, against the copy bandwidth.

    python -m benchmarks.tune_group_norm                  # U-Net shapes, bf16 and fp32, fwd/jvp/bwd
    python -m benchmarks.tune_group_norm --kernels fwd --sizes 2048,4096,8192 --warps 4,8,16

Each kernel is timed on the device alone (the replay of a CUDA graph holding 20 calls, per call:
no host time) for every candidate (tile size, num_warps): a candidate replaces
`scm_kernels.group_norm.triton_kernels.CONFIGS` by the three tiles (2, E/2), (8, E/8), (32, E/32)
of E elements and `NUM_WARPS` by its warps; the launcher then picks the tile as it always does.
GB/s counts the minimal bytes of each kernel (fwd: read x, write y; jvp: read x and x_dot, write
y_dot; bwd: read dy and x, write dx); `copy` is `y.copy_(x)` of the same tensor, timed the same
way in the same run, and `%copy` the ratio of the two bandwidths. The shipped candidate is marked
`*`. A candidate goes into the kernels' tables only after `python -m scm_kernels.aot` shows it
compiles without spills for sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.gpu_overhead import graph_ms

SHAPES = ((32, 512, 64, 64), (32, 256, 64, 64), (32, 512, 32, 32), (64, 768, 16, 16), (8, 256, 32, 32))


def _params(N: int, C: int) -> dict:
    """fp32 gamma, beta (C,), scale, shift (N, C) and their tangents."""
    g = torch.Generator(device="cuda").manual_seed(1)
    per_c, per_nc = ("w", "b", "wd", "bd"), ("sc", "sh", "scd", "shd")
    return {k: torch.randn(*((C,) if k in per_c else (N, C)), device="cuda", generator=g)
            for k in per_c + per_nc}


def _copy_ms(shape, dtype) -> float:
    """Device time of y.copy_(x) for one x of this shape and dtype."""
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    y = torch.empty_like(x)
    return graph_ms(lambda: y.copy_(x))


def cases(shape, dtype, channels_last: bool, G: int = 32):
    """(kernel, minimal bytes, fn) for the three kernels on one input."""
    from scm_kernels.group_norm import triton_kernels as tk

    x = torch.randn(*shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    N, C = shape[:2]
    x3 = x.view(N, C, -1)  # (N, C, S), channels_last too: strides (C S, 1, C)
    xd3 = torch.randn_like(x3)
    dy3 = torch.randn_like(x3)
    a = _params(N, C)
    _, mean, rstd = tk.group_norm(x3, a["w"], a["b"], a["sc"], a["sh"], G, 1e-5, True)
    nb = x.numel() * x.element_size()
    yield "fwd", 2 * nb, lambda: tk.group_norm(x3, a["w"], a["b"], a["sc"], a["sh"], G, 1e-5, True)
    yield "jvp", 3 * nb, lambda: tk.group_norm_jvp(x3, xd3, a["w"], a["b"], a["sc"], a["sh"], a["wd"],
                                                   a["bd"], a["scd"], a["shd"], mean, rstd, G, True)
    yield "bwd", 3 * nb, lambda: tk.group_norm_backward(dy3, x3, a["w"], a["b"], a["sc"], a["sh"], mean,
                                                        rstd, G, True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_group_norm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="fwd,jvp,bwd")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--sizes", default="2048,4096,8192", help="tile sizes E (elements)")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--channels-last", action="store_true", help="also the channels_last layout")
    p.add_argument("--resident", action="store_true", help="also sweep the forward's mode-3 tiles")
    p.add_argument("--shapes", default=None, help="e.g. 32x512x64x64,8x256x32x32")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_group_norm needs a CUDA device")
    from scm_kernels.group_norm import triton_kernels as tk

    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    shapes = SHAPES if a.shapes is None else [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    shipped = (tk.CONFIGS, tk.NUM_WARPS, tk.RESIDENT_TILES, tk.RESIDENT_MIN)
    # a candidate without the forward's one-read mode 3 (RESIDENT_TILES empty) shows its gain
    cands = [shipped, (tk.CONFIGS, tk.NUM_WARPS, (), tk.RESIDENT_MIN)]
    if a.resident:
        cands += [(tk.CONFIGS, tk.NUM_WARPS, ((t, w),), 4096) for t in (8192, 16384) for w in (4, 8, 16)]
    cands += [(((2, e // 2), (8, e // 8), (32, e // 32)), w, (), tk.RESIDENT_MIN) for e in ints(a.sizes)
              for w in ints(a.warps)]
    cands = list(dict.fromkeys(cands))
    kernels = a.kernels.split(",")
    print(torch.cuda.get_device_name())
    for dname in a.dtypes.split(","):
        for shape in shapes:
            for cl in ((False, True) if a.channels_last else (False,)):
                copy_ms = _copy_ms(shape, dtypes[dname])
                copy_bw = 2 * math.prod(shape) * dtypes[dname].itemsize / copy_ms / 1e6
                print(f"\n{dname} {'x'.join(map(str, shape))} {'channels_last' if cl else 'NCHW'}: "
                      f"copy {copy_ms * 1e3:.1f} us = {copy_bw:.0f} GB/s")
                print(f"  {'kernel':6s} {'tile size, warps':18s} {'us':>8s} {'GB/s':>7s} {'%copy':>6s}")
                for kernel in kernels:
                    rows = []
                    for cfgs, warps, res, rmin in cands:
                        if kernel != "fwd" and (res, rmin) not in (((), shipped[3]), shipped[2:]):
                            continue  # mode 3 is the forward's
                        tk.CONFIGS, tk.NUM_WARPS, tk.RESIDENT_TILES, tk.RESIDENT_MIN = cfgs, warps, res, rmin
                        N, C = shape[:2]
                        r = tk.resident_tile(N, C, math.prod(shape[2:]), 32, torch.device("cuda"),
                                             dtypes[dname])
                        label = (cfgs[0][0] * cfgs[0][1], warps)
                        if kernel == "fwd" and r is not None:
                            label = ("res", r[0] * r[1], r[2])
                        if any(row[0] == label for row in rows):
                            continue  # the same kernel and tile as a candidate before
                        try:
                            for name, nbytes, fn in cases(shape, dtypes[dname], cl):
                                if name == kernel:
                                    ms = graph_ms(fn)
                                    rows.append((label, ms, nbytes / ms / 1e6))
                        except Exception as e:  # out of resources: a row, not the end of the sweep
                            rows.append((label, math.nan, math.nan))
                            print(f"  {kernel} {label}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                        finally:
                            (tk.CONFIGS, tk.NUM_WARPS, tk.RESIDENT_TILES, tk.RESIDENT_MIN) = shipped
                            torch.cuda.empty_cache()
                    order = sorted(range(len(rows)), key=lambda i: (math.isnan(rows[i][1]), rows[i][1]))
                    for i in order:
                        cfg, ms, bw = rows[i]
                        mark = "*" if i == 0 else " "
                        pct = bw / copy_bw * 100
                        print(f" {mark}{kernel:6s} {str(cfg):18s} {ms * 1e3:8.1f} {bw:7.0f} {pct:5.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
