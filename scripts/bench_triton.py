"""Bandwidth of the Triton kernels on a GPU: GB/s of the bytes they must read/write, next to a
measured device-to-device copy bandwidth (the practical ceiling).

    python scripts/bench_triton.py [--n 4096] [--k 4096] [--m 1,2,4,8,16] [--ctx 4096]

Quantized GEMV: W bytes + x + y per call, for every type the kernel reads, at each M (decode is
M = 1, MTP verify M = draft + 1), next to a bf16 torch matmul (cuBLAS) over the same shape.
Attention (decode, T = 1): K + V bytes of the visible slots + q + out, f16 and q8_0/q4_0 KV.

Timing: each measurement is a CUDA graph of one call per weight copy, over enough copies that they
do not fit in L2 (so the bytes really come from HBM), replayed and timed with CUDA events; the
median of the replays over the number of calls is one call's time (launch gaps are what a
CUDA-graph decode step has, not Python's). Only meaningful on a CUDA device; on CPU it refuses
with a one-line message.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def _graph_ms(calls, reps: int = 20) -> float:
    """Median time of one call in ms: `calls` (a list of thunks) captured into one CUDA graph."""
    for fn in calls:  # compile / autotune outside the capture
        fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in calls:
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    return statistics.median(times)


def _copies(nbytes_one: int, l2_bytes: int) -> int:
    """How many copies of a buffer make the working set >= 4x L2 (at least 4, at most 64)."""
    return max(4, min(64, -(-4 * l2_bytes // max(nbytes_one, 1))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="GEMV output rows")
    ap.add_argument("--k", type=int, default=4096, help="GEMV input columns (multiple of 256)")
    ap.add_argument("--m", default="1,2,4,8,16", help="GEMV input rows (comma list, <= 16)")
    ap.add_argument("--ctx", type=int, default=4096, help="attention KV slots")
    ap.add_argument("--types", default=None, help="quant types (comma list; default: all)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device; Triton GPU bandwidth is only measurable on a GPU")
        return 1

    from gguf import GGMLQuantizationType as QT

    from llmkit.kernels.triton_attention import attention
    from llmkit.kernels.triton_gemv import SUPPORTED_TYPES, qgemv
    from llmkit.quant.quantize import quantize

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / _graph_ms([lambda s=src, d=dst: d.copy_(s)]) / 1e6
    print(
        f"{torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, L2 {l2 >> 20} MiB): "
        f"device copy {copy_gbs:.0f} GB/s (read + write, 1 GiB)"
    )
    del src, dst

    N, K = args.n, args.k
    ms_list = [int(m) for m in args.m.split(",")]
    types = (
        [QT[t.upper()] for t in args.types.split(",")]
        if args.types
        else sorted(SUPPORTED_TYPES, key=lambda t: t.name)
    )
    w_f = torch.randn(N, K) * 0.02
    rows = []
    for qt in [None, *types]:  # None: dense bf16 weights, torch matmul (cuBLAS)
        if qt is None:
            w0 = w_f.to(dev, torch.bfloat16)
            name = "bf16 torch"
        else:
            w0 = quantize(w_f, qt).to(dev)
            name = qt.name
        wbytes = w0.numel() * w0.element_size()
        ws = [w0.clone() for _ in range(_copies(wbytes, l2))]
        for M in ms_list:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            if qt is None:
                calls = [lambda w=w, x=x: F.linear(x, w) for w in ws]
            else:
                calls = [lambda w=w, x=x, qt=qt: qgemv(x, w, qt) for w in ws]
            ms = _graph_ms(calls)
            nbytes = wbytes + x.numel() * 2 + M * N * 4
            gbs = nbytes / ms / 1e6
            rows.append((name, M, ms * 1e3, gbs, 100 * gbs / copy_gbs))
        del ws
        torch.cuda.empty_cache()
    print(f"\nGEMV N={N} K={K} (graph-timed, {len(ms_list)} values of M)")
    print("| weights | M | us/call | GB/s | % of copy |\n|---|---:|---:|---:|---:|")
    for name, M, us, gbs, pct in rows:
        print(f"| {name} | {M} | {us:.1f} | {gbs:.0f} | {pct:.0f}% |")

    Hq, Hkv, D, S = 32, 8, 128, args.ctx
    print(f"\nattention decode Hq={Hq} Hkv={Hkv} D={D} S={S} (graph-timed)")
    print("| KV | window | us/call | GB/s | % of copy |\n|---|---:|---:|---:|---:|")
    kpos = torch.arange(S, device=dev)
    qpos = torch.tensor([S - 1], device=dev)
    q = torch.randn(1, Hq, D, device=dev, dtype=torch.float16)
    for kv in ("f16", "q8_0", "q4_0"):
        kf = torch.randn(Hkv, S, D, device=dev, dtype=torch.float16)
        vf = torch.randn(Hkv, S, D, device=dev, dtype=torch.float16)
        if kv == "f16":
            k, v, kt, per_el = kf, vf, None, 2.0
        else:
            k = quantize(kf.float().cpu(), QT[kv.upper()]).to(dev)
            v = quantize(vf.float().cpu(), QT[kv.upper()]).to(dev)
            kt, per_el = kv, {"q8_0": 34 / 32, "q4_0": 18 / 32}[kv]
        n_copies = _copies(2 * k.numel() * k.element_size(), l2)
        kvs = [(k.clone(), v.clone()) for _ in range(n_copies)]
        for window in (None, 1024):
            vis = S if window is None else min(S, window)
            nbytes = 2 * Hkv * vis * D * per_el + 2 * Hq * D * 2 + 8 * (S + 1)
            calls = [
                lambda kk=kk, vv=vv, w=window, kt=kt: attention(
                    q, kk, vv, kpos, qpos, None, w, k_type=kt, v_type=kt
                )
                for kk, vv in kvs
            ]
            ms = _graph_ms(calls)
            gbs = nbytes / ms / 1e6
            print(f"| {kv} | {window} | {ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |")
        del kvs
    return 0


if __name__ == "__main__":
    sys.exit(main())
