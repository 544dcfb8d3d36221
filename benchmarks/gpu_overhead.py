"""Device time versus call time of each op on a GPU: how much of a call is the host.

    python -m benchmarks.gpu_overhead

For the benchmark shapes of each op, the scm_kernels call and its eager reference are timed two
ways: `call` = triton.testing.do_bench of the Python call (what benchmarks.run reports: host
dispatch and launches included), and `device` = the replay of a CUDA graph holding 20 calls, per
call (the kernels alone, no host work). GB/s uses the device time and the minimal bytes.
"""

from __future__ import annotations

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_ms(fn, n: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return _bench(g.replay) / n


def cases():
    import scm_kernels
    from scm_kernels.group_norm import reference as gn_ref
    from scm_kernels.time_embedding import reference as te_ref
    from scm_kernels.trigflow_step import reference as tf_ref

    dev = "cuda"
    x = torch.randn(8, 256, 32, 32, device=dev)
    w, b = torch.randn(256, device=dev), torch.randn(256, device=dev)
    sc, sh = torch.randn(8, 256, device=dev), torch.randn(8, 256, device=dev)
    gn_bytes = 2 * x.numel() * 4
    yield ("group_norm fwd fp32 8x256x32x32", gn_bytes,
           lambda: scm_kernels.group_norm(x, 32, w, b, scale=sc, shift=sh, activation="silu"),
           lambda: gn_ref.group_norm(x, 32, w, b, 1e-5, scale=sc, shift=sh, activation="silu"))
    xb = torch.randn(32, 512, 64, 64, device=dev, dtype=torch.bfloat16)
    # bf16 parameters too: torch's CUDA group_norm (the eager reference) takes one dtype
    w2, b2 = (torch.randn(512, device=dev, dtype=torch.bfloat16) for _ in range(2))
    sc2, sh2 = (torch.randn(32, 512, device=dev, dtype=torch.bfloat16) for _ in range(2))
    yield ("group_norm fwd bf16 32x512x64x64", 2 * xb.numel() * 2,
           lambda: scm_kernels.group_norm(xb, 32, w2, b2, scale=sc2, shift=sh2, activation="silu"),
           lambda: gn_ref.group_norm(xb, 32, w2, b2, 1e-5, scale=sc2, shift=sh2, activation="silu"))
    xt, F = torch.randn(64, 3, 64, 64, device=dev), torch.randn(64, 3, 64, 64, device=dev)
    t = torch.rand(64, device=dev)
    yield ("trigflow_step denoise fp32 64x3x64x64", 3 * xt.numel() * 4,
           lambda: scm_kernels.trigflow_step(xt, F, t, 0.5),
           lambda: tf_ref.trigflow_step(xt, F, t, 0.5))
    xl, Fl = torch.randn(64, 3, 256, 256, device=dev), torch.randn(64, 3, 256, 256, device=dev)
    yield ("trigflow_step denoise fp32 64x3x256x256", 3 * xl.numel() * 4,
           lambda: scm_kernels.trigflow_step(xl, Fl, t, 0.5),
           lambda: tf_ref.trigflow_step(xl, Fl, t, 0.5))
    tt = torch.rand(256, device=dev)
    yield ("time_embedding fwd B=256 dim=256", 256 * 256 * 4,
           lambda: scm_kernels.time_embedding(tt, 256),
           lambda: te_ref.time_embedding(tt, 256))
    q = torch.randn(2, 16, 4096, 64, device=dev, dtype=torch.bfloat16)
    yield ("attention fwd bf16 2x16x4096x64", 4 * q.numel() * 2,
           lambda: scm_kernels.attention(q, q, q),
           lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_overhead needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}   ms per call: call = do_bench of the Python call, device = CUDA-graph replay")
    print(f"{'case':42s} {'scm call':>9s} {'scm dev':>9s} {'GB/s':>7s} {'eager call':>10s} {'eager dev':>9s}")
    for name, nbytes, ours, eager in cases():
        try:
            c, d = _bench(ours), graph_ms(ours)
            ce, de = _bench(eager), graph_ms(eager)
            print(f"{name:42s} {c:9.4f} {d:9.4f} {nbytes / d / 1e6:7.0f} {ce:10.4f} {de:9.4f}")
        except Exception as e:
            print(f"{name:42s} error: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
