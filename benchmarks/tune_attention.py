"""Sweep the tile configurations of the Triton attention kernels on this GPU.

    python -m benchmarks.tune_attention                         # fwd and jvp, bf16, d = 64 and 128
    python -m benchmarks.tune_attention --kernels fwd --dims 64 --dtype fp16 --seq 8192

For each (kernel, head-dim bucket) it times every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a
grid through the public functions (`attention` for fwd, `attention_jvp` for jvp), with the table
entry of `scm_kernels/attention/triton_fwd.py:_CFG` swapped in, and prints TFLOP/s per config, the
shipped one marked `*`, and torch SDPA's forward for scale. A config that fails to compile (shared
memory, registers) is listed as such. Outputs are checked against the shipped config's output
(a wrong result marks the row). A candidate goes into `_CFG` only after `python -m scm_kernels.aot`
shows it compiles without spills for sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

FLOPS_PER = {"fwd": 4, "jvp": 10}  # multiply-adds x 2 per (query, key, head dim): fwd 2 products, jvp 5


def _time(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(kernel: str, block_d: int, dtype: torch.dtype, B: int, H: int, N: int, grid) -> list:
    import scm_kernels
    from scm_kernels.attention import triton_fwd

    D = block_d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(B, H, N, D, device="cuda", generator=g, dtype=dtype) for _ in range(6))
    cls = "lowp" if dtype != torch.float32 else ("ieee" if torch.get_float32_matmul_precision() == "highest"
                                                  else "tf32")
    table = triton_fwd._CFG[(kernel, cls)]
    shipped = table.get(block_d)

    def call():
        if kernel == "fwd":
            return (scm_kernels.attention(q, k, v, backend="triton"),)
        return scm_kernels.attention_jvp(q, k, v, tq, tk, tv, backend="triton")

    want = [o.float() for o in call()] if shipped is not None else None
    flops = FLOPS_PER[kernel] * B * H * N * N * D
    rows = []
    for cfg in ([shipped] if shipped else []) + [c for c in grid if c != shipped]:
        table[block_d] = cfg
        try:
            got = call()
            torch.cuda.synchronize()
            ok = want is None or all(float((a.float() - b).abs().max()) <= 2e-2 * max(1.0, float(b.abs().max()))
                                     for a, b in zip(got, want))
            ms = _time(call)
            rows.append((cfg, ms, flops / ms / 1e9, "" if ok else "WRONG RESULT"))
        except Exception as e:  # out of resources and the like: a row, not the end of the sweep
            rows.append((cfg, math.nan, math.nan, type(e).__name__ + ": " + str(e).splitlines()[0][:60]))
        finally:
            table[block_d] = shipped
            if shipped is None:
                del table[block_d]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="fwd,jvp")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--block-m", default="64,128")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention needs a CUDA device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    grid = [(m, n, w, s, 0) for m, n, w, s in itertools.product(ints(a.block_m), ints(a.block_n), ints(a.warps),
                                                                ints(a.stages))]
    print(f"{torch.cuda.get_device_name()}  B={a.batch} H={a.heads} N={a.seq} {a.dtype}")
    for d in ints(a.dims):
        q = torch.randn(a.batch, a.heads, a.seq, d, device="cuda", dtype=dtype)
        sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
        print(f"\nd={d}: torch SDPA fwd {sdpa:.4f} ms = {4 * a.batch * a.heads * a.seq ** 2 * d / sdpa / 1e9:.1f} TFLOP/s")
        for kernel in a.kernels.split(","):
            rows = sweep(kernel, d, dtype, a.batch, a.heads, a.seq, grid)
            print(f"  {kernel}  (BLOCK_M, BLOCK_N, warps, stages, D_CHUNK)        ms   TFLOP/s")
            shipped = rows[0][0] if rows else None
            for cfg, ms, tf, note in sorted(rows, key=lambda r: (math.isnan(r[1]), r[1])):
                mark = "*" if cfg == shipped else " "
                print(f"  {mark} {str(cfg):40s} {ms:9.4f} {tf:8.1f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
