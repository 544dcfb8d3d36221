"""Sweep the tile configurations of the Triton attention kernels on this GPU.

    python -m benchmarks.tune_attention                         # fwd and jvp, bf16, d = 64 and 128
    python -m benchmarks.tune_attention --kernels fwd --dims 64 --dtype fp16 --seq 8192
    python -m benchmarks.tune_attention --kernels bwd,jvp_bwd --dims 64     # backward tiles

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


def sweep_bwd(jvp: bool, block_d: int, dtype: torch.dtype, B: int, H: int, N: int, grid,
              device: str = "cuda") -> list:
    """The backward tiles of `triton_bwd.GPU_CONFIGS` ((A26) with jvp=False, (A27) with jvp=True): each
    (BLOCK_M, BLOCK_N, warps, stages) of the grid as the dk/dv tile (dq tile as shipped), then as the
    dq tile (dk/dv as shipped), each with SPLIT as shipped. Rows: (("dkdv" | "dq", tile), ms, TFLOP/s,
    note). Run on an H100 on 2026-11-23 (see GPU_CONFIGS in triton_bwd.py)."""
    import scm_kernels
    from scm_kernels.attention import triton_bwd

    if dtype == torch.float32:
        raise SystemExit("--kernels bwd/jvp_bwd: fp16 or bf16 (the fp32 tables are keyed by precision)")
    D = block_d
    g = torch.Generator(device=device).manual_seed(0)
    leaves = [torch.randn(B, H, N, D, device=device, generator=g, dtype=dtype).requires_grad_()
              for _ in range(6 if jvp else 3)]
    if jvp:
        outs = scm_kernels.attention_jvp(*leaves, backend="triton")
    else:
        outs = (scm_kernels.attention(*leaves, backend="triton"),)
    gouts = [torch.randn_like(o) for o in outs]
    key = (block_d, jvp, False, False)
    shipped = triton_bwd.GPU_CONFIGS[key]
    if shipped is None:
        raise SystemExit(f"no shipped backward tiles for d={block_d} (jvp={jvp}): it runs blockwise")

    def call():
        return torch.autograd.grad(outs, leaves, gouts, retain_graph=True)

    want = [x.float() for x in call()]
    flops = (10 if not jvp else 25) * B * H * N * N * D  # A26: 5 products; A27: ~12.5 (a rough count)
    rows = []
    for which, i in (("dkdv", 0), ("dq", 1)):
        for tile in [shipped[i]] + [t for t in grid if t != shipped[i]]:
            cfg = list(shipped)
            cfg[i] = tile
            triton_bwd.GPU_CONFIGS[key] = tuple(cfg)
            try:
                got = call()
                ok = all(float((a.float() - b).abs().max()) <= 2e-2 * max(1.0, float(b.abs().max()))
                         for a, b in zip(got, want))
                ms = _time(call)
                rows.append(((which, tile), ms, flops / ms / 1e9, "" if ok else "WRONG RESULT"))
            except Exception as e:  # out of resources and the like
                note = type(e).__name__ + ": " + str(e).splitlines()[0][:60]
                rows.append(((which, tile), math.nan, math.nan, note))
            finally:
                triton_bwd.GPU_CONFIGS[key] = shipped
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="fwd,jvp", help="comma-separated: fwd, jvp, bwd, jvp_bwd")
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
            if kernel in ("bwd", "jvp_bwd"):
                bgrid = [g[:4] for g in grid]
                rows = sweep_bwd(kernel == "jvp_bwd", d, dtype, a.batch, a.heads, a.seq, bgrid)
                print(f"  {kernel}  (which tile, (BLOCK_M, BLOCK_N, warps, stages))  ms   TFLOP/s")
                firsts = {r[0][0]: r[0] for r in reversed(rows)}  # the shipped tile leads each part
                for cfg, ms, tf, note in sorted(rows, key=lambda r: (r[0][0], math.isnan(r[1]), r[1])):
                    mark = "*" if firsts.get(cfg[0]) == cfg else " "
                    print(f"  {mark} {str(cfg):46s} {ms:9.4f} {tf:8.1f}  {note}")
                continue
            rows = sweep(kernel, d, dtype, a.batch, a.heads, a.seq, grid)
            print(f"  {kernel}  (BLOCK_M, BLOCK_N, warps, stages, D_CHUNK)        ms   TFLOP/s")
            shipped = rows[0][0] if rows else None
            for cfg, ms, tf, note in sorted(rows, key=lambda r: (math.isnan(r[1]), r[1])):
                mark = "*" if cfg == shipped else " "
                print(f"  {mark} {str(cfg):40s} {ms:9.4f} {tf:8.1f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
