"""CPU matmul kernels on the real models' weights, and the cost of an MTP verify batch.

    python scripts/bench_cpu_kernels.py [-t 2] [-r 50] [MODEL ...]

Part 1: memory copy bandwidth (copy_ of 256 MiB into a touched buffer, min of 5), the roof for a GEMV.
Part 2: for each distinct (type, shape) of one layer plus the LM head, the microseconds per call
and GB/s of *stored* bytes (what the kernel reads) of the kernel dispatch picks, at M = 1, 2, 4, 16
rows, next to the dense bf16 copy it replaced. Median of `-r` calls after 5 warm-ups.
Part 3: a whole-model forward of M = 1..4 tokens on a 256-token context (decode and MTP verify
batches), median of `-r` / 5 runs, and its ratio to M = 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.kernels.linear_torch import DenseLinear, _dense_matmul


def _median_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def copy_bandwidth() -> float:
    a = torch.ones(256 << 20, dtype=torch.uint8)
    b = torch.zeros_like(a)  # preallocated and touched: no page faults inside the timing
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() / best / 1e9  # read + write


def stored_bytes(lin) -> int:
    if isinstance(lin, DenseLinear):
        return lin.weight.numel() * lin.weight.element_size()
    return lin.nbytes


def kernels(lm, reps: int) -> None:
    weights = lm.model.blocks[1].w
    lins = {n: getattr(weights, n) for n in ("wqkv", "wo", "w_gate_up", "w_down")}
    lins["output"] = lm.model.output
    for name, lin in lins.items():
        n, k = lin.out_features, lin.in_features
        nbytes = stored_bytes(lin)
        dense = None
        if not isinstance(lin, DenseLinear):  # the bf16 copy it replaced, for comparison
            dense = lin.dense().to(torch.bfloat16)
        for m in (1, 2, 4, 16):
            x = torch.randn(m, k)
            us = _median_us(lambda: lin(x), reps)  # noqa: B023
            line = (
                f"  {name:<10} {type(lin).__name__:<12} [{n:>6} x {k:>5}] M={m:<2} "
                f"{us:8.1f} us {nbytes / us / 1e3:6.1f} GB/s"
            )
            if dense is not None:
                ud = _median_us(lambda: _dense_matmul(x, dense), reps)  # noqa: B023
                line += f" | bf16 dense {ud:8.1f} us ({ud / us:4.2f}x)"
            print(line)


def verify_batches(lm, reps: int) -> None:
    runs = max(3, reps // 5)
    with torch.inference_mode():
        base = None
        for m in (1, 2, 3, 4):
            ts = []
            for _ in range(runs + 1):
                cache = lm.new_cache(512)
                lm.model.forward(torch.randint(0, 1000, (256,)), cache)
                ids = torch.randint(0, 1000, (m,))
                t0 = time.perf_counter()
                lm.model.forward(ids, cache, logits="all")
                ts.append(time.perf_counter() - t0)
            ms = statistics.median(ts[1:]) * 1e3
            base = base or ms
            print(f"  forward of M={m} tokens at n_past=256: {ms:7.2f} ms ({ms / base:4.2f}x M=1)")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}; copy bandwidth {copy_bandwidth():.1f} GB/s (read + write)")
    for m in a.models:
        lm = load_model(resolve_model(m))
        print(f"{lm.describe()}")
        with torch.inference_mode():
            kernels(lm, a.reps)
        verify_batches(lm, a.reps)


if __name__ == "__main__":
    main()
