"""Bandwidth of the Triton kernels on a GPU: GB/s of the bytes they must read/write, next to a
measured device-to-device copy bandwidth (the practical ceiling).

    python scripts/bench_triton.py [--n 4096] [--k 4096] [--m 1] [--ctx 4096]

Quantized GEMV: W bytes + x + y per call. Attention (decode, T = 1): K + V bytes of the visible
slots + q + out. Only meaningful on a CUDA device; on CPU it refuses with a one-line message.
"""

from __future__ import annotations

import argparse
import sys

import torch


def _time_ms(fn, iters: int = 50) -> float:
    """Median wall time of fn() in ms, CUDA-event timed after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="GEMV output rows")
    ap.add_argument("--k", type=int, default=4096, help="GEMV input columns (multiple of 256)")
    ap.add_argument("--m", type=int, default=1, help="GEMV input rows (<= 16: GEMV regime)")
    ap.add_argument("--ctx", type=int, default=4096, help="attention KV slots")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device; Triton GPU bandwidth is only measurable on a GPU")
        return 1

    from llmkit.kernels.triton_attention import attention
    from llmkit.kernels.triton_gemv import SUPPORTED_TYPES, qgemv
    from llmkit.quant.quantize import quantize

    dev = torch.device("cuda")
    src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / _time_ms(lambda src=src, dst=dst: dst.copy_(src)) / 1e6
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbs:.0f} GB/s (read + write)")
    del src, dst

    N, K, M = args.n, args.k, args.m
    w_f = torch.randn(N, K) * 0.02
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    for qt in sorted(SUPPORTED_TYPES, key=lambda t: t.name):
        w = quantize(w_f, qt).to(dev)
        nbytes = w.numel() + x.numel() * 2 + M * N * 4
        ms = _time_ms(lambda w=w, qt=qt: qgemv(x, w, qt))
        gbs = nbytes / ms / 1e6
        print(
            f"qgemv {qt.name:5s} M={M} N={N} K={K}: {ms * 1e3:8.1f} us  {gbs:7.1f} GB/s  "
            f"({100 * gbs / copy_gbs:.0f}% of copy)"
        )

    Hq, Hkv, D, S = 32, 8, 128, args.ctx
    for dt in (torch.float16, torch.float32):
        q = torch.randn(1, Hq, D, device=dev, dtype=dt)
        k = torch.randn(Hkv, S, D, device=dev, dtype=dt)
        v = torch.randn(Hkv, S, D, device=dev, dtype=dt)
        kpos = torch.arange(S, device=dev)
        qpos = torch.tensor([S - 1], device=dev)
        es = k.element_size()
        for window in (None, 1024):
            vis = S if window is None else min(S, window)
            nbytes = 2 * Hkv * vis * D * es + 2 * Hq * D * es + 8 * (S + 1)
            ms = _time_ms(
                lambda q=q, k=k, v=v, kp=kpos, qp=qpos, w=window: attention(
                    q, k, v, kp, qp, None, w
                )
            )
            gbs = nbytes / ms / 1e6
            print(
                f"attention decode {str(dt)[6:]:8s} Hq={Hq} Hkv={Hkv} D={D} S={S} "
                f"window={window}: {ms * 1e3:8.1f} us  {gbs:7.1f} GB/s "
                f"({100 * gbs / copy_gbs:.0f}% of copy)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
