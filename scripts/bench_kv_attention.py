"""Decode-step attention over a long context, per KV cache type, on the CPU.

    python scripts/bench_kv_attention.py [-t 2] [--ctx 4096,8192,16384,32768]
                                         [--types f16,q8_0,q4_0,turbo4,turbo3] [-r 10] [--torch]
                                         [--rows 1,2,3,4]

One layer of a KVCache (core/cache/kv.py) is filled with S random K/V rows through the cache's own
store (core/cache/store.py), then one decode step is timed the way a model block makes it:
`cache.begin([S])` (not timed: once per step for all layers) and `cache.attend(0, q, k, v)` (timed:
the new row's write and one query row attending over S + 1 positions), rolled back after each
repetition. `--rows`: steps of M query rows at positions S .. S + M - 1 instead (an MTP verify
batch, causal among its rows). Which kernel runs is the kernel table's choice for the cache type
(kernels/ops.py: the native kernel for f16 / q8_0 / q4_0, the torch path for turbo3 / turbo4);
`--torch` also runs the non-turbo types on the torch path (the same path turbo takes).

Shapes (full-attention layers): SmolLM2-135M (9 q heads, 3 kv heads, head dim 64) and Gemma 3
270M (4 q heads, 1 kv head, head dim 256; its sliding layers read 512 positions at most, only its
global layers read the whole context). GB/s: the K and V bytes of the S + 1 cached rows as stored
(KV read once per kv head) over the step's time. Prints min / median over -r repetitions after a
warm-up; on a shared machine the minimum is the steadier figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmkit.cli.common import set_threads
from llmkit.core.bench.report import cpu_name
from llmkit.core.cache.kv import KVCache
from llmkit.core.cache.layout import LayerKV
from llmkit.core.cache.store import buffer_bytes, store

SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}  # (q heads, kv heads, head dim)
FILL_CHUNK = 4096


def make_cache(
    shape: tuple[int, int, int], kind: str, S: int, kernel: str | None, rows: int = 1
) -> KVCache:
    """One full-attention layer holding positions 0..S-1 of random K/V (unit-variance rows, as
    a trained model's K/V after its norms roughly are)."""
    _, hkv, d = shape
    cache = KVCache({0: LayerKV(hkv, d, d)}, S + rows, margin=rows, type_k=kind, type_v=kind,
                    attn_kernel=kernel)  # fmt: skip
    g = cache.group_of[0]
    gen = torch.Generator().manual_seed(0)
    for p0 in range(0, S, FILL_CHUNK):
        n = min(FILL_CHUNK, S - p0)
        slots = torch.arange(p0, p0 + n)
        for buf in (g.k[0], g.v[0]):
            store(buf, kind, slots, torch.randn(n, hkv, d, generator=gen))
    g.slot_pos[:S] = torch.arange(S)
    cache.n_past = S
    return cache


def time_step(
    cache: KVCache, shape: tuple[int, int, int], S: int, reps: int, rows: int = 1
) -> list[float]:
    """Seconds of `attend` for one step of `rows` query rows at positions S.., `reps` times
    after a warm-up."""
    hq, hkv, d = shape
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(rows, hq, d, generator=gen)
    k, v = torch.randn(rows, hkv, d, generator=gen), torch.randn(rows, hkv, d, generator=gen)
    pos = torch.arange(S, S + rows)
    out = []
    with torch.inference_mode():
        for r in range(reps + 1):
            cache.begin(pos)
            t0 = time.perf_counter()
            cache.attend(0, q, k, v, d**-0.5)
            dt = time.perf_counter() - t0
            cache.truncate(S)
            if r:  # the first call is the warm-up (binds the layer's native step, warms caches)
                out.append(dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=0, help="0: every core")
    ap.add_argument("--ctx", default="4096,8192,16384,32768", help="context lengths S")
    ap.add_argument("--types", default="f16,q8_0,q4_0,turbo4,turbo3")
    ap.add_argument("--models", default="smollm2,gemma3", help=", ".join(SHAPES))
    ap.add_argument("-r", "--repetitions", type=int, default=10)
    ap.add_argument("--torch", action="store_true", help="also the torch path for non-turbo types")
    ap.add_argument("--rows", default="1", help="query rows per step (verify batches: 1,2,3,4)")
    a = ap.parse_args()
    n = set_threads(a.threads)
    print(f"CPU: {cpu_name()}, {n} threads; min / median of {a.repetitions} repetitions")
    print("| model | kv type | kernel | ctx | rows | ms min | ms median | GB/s (min) | MB read |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in a.models.split(","):
        shape = SHAPES[model]
        for kind in a.types.split(","):
            kernels = [None] + (["torch"] if a.torch and not kind.startswith("turbo") else [])
            for kernel in kernels:
                for S in map(int, a.ctx.split(",")):
                    for m in map(int, a.rows.split(",")):
                        cache = make_cache(shape, kind, S, kernel, m)
                        t = time_step(cache, shape, S, a.repetitions, m)
                        nbytes = 2 * buffer_bytes(kind, shape[1], S + m, shape[2])
                        print(
                            f"| {model} | {kind} | {cache.attn_kernel} | {S} | {m} | "
                            f"{min(t) * 1e3:.3f} | {statistics.median(t) * 1e3:.3f} | "
                            f"{nbytes / min(t) / 1e9:.2f} | {nbytes / 1e6:.1f} |",
                            flush=True,
                        )
                        del cache


if __name__ == "__main__":
    main()
