"""x8 groups against GGUF rows (kernels/cpu_pack.py, `--no-repack`): a forward of M rows, paired.

    python scripts/bench_x8.py [MODEL ...] [--rows 1,2,3,4] [-r 10] [-n 16] [-t 2]
    python scripts/bench_x8.py --matrices Q6_K,Q4_K [--rows 1,2,4] [-r 30] [--isa avx2]

Loads each model twice in one process, once with its weights packed into x8 groups and once as
the GGUF rows, each with its own KV cache after the same random 100-token context; then, in -r
rounds that alternate which goes first, times -n forwards of M rows (logits for every row, as an
MTP verify batch) on each. Prints the median ms per forward and the median of the per-round
ratios x8 / rows (drift on a shared machine hits both sides of a pair alike), and each layout's
M-row cost against its own M = 1 (the caches grow by M per forward, so larger M also attends
over more positions).

`--matrices`: one random matrix per type on the FFN-down shapes, packed and as rows, one thread,
cached (compute, not DRAM), timed as scripts/ab_native.py times two builds (cpu_timing.paired:
the smallest of -r round medians of 50 calls timed in C, the layouts taking turns); prints both
and x8 / rows. Both layouts give the same bits (checked first).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.kernels import cpu_native, cpu_timing, ops
from llmkit.quant.quantize import quantize


def matrices(types: list[str], rows: list[int], rounds: int) -> None:
    """x8 / rows per type, shape and M (--matrices)."""
    for t in types:
        for n, k in cpu_timing.FFN_SHAPES:
            raw = quantize(torch.randn(n, k) * 0.02, QT[t])
            lins = [cpu_native.NativeLinear([(raw, QT[t], (n, k))], pack=p) for p in (True, False)]
            for m in rows:
                x = torch.randn(m, k)
                if not torch.equal(lins[0](x), lins[1](x)):
                    raise SystemExit(f"{t} {n}x{k} M={m}: x8 and rows differ")
                calls = [functools.partial(cpu_timing.warm_times, lin, x, 50) for lin in lins]
                x8, rw = cpu_timing.paired(calls, rounds)
                print(f"{t:5} {n}x{k}  M={m}  x8 {x8:7.1f} us  rows {rw:7.1f} us  x8/rows "
                      f"{x8 / rw:.3f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--rows", default="1,2,3,4")
    ap.add_argument("-r", "--rounds", type=int, default=10)
    ap.add_argument("-n", type=int, default=16, help="forwards per timing")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--matrices", help="types: single matrices, not models (one thread)")
    ap.add_argument("--isa", default="best", help="with --matrices: the path (e.g. avx2)")
    a = ap.parse_args()
    rows = [int(m) for m in a.rows.split(",")]
    if a.matrices:
        cpu_native.set_isa(a.isa)  # before packing: the path decides what it packs
        cpu_native.set_threads(1)
        return matrices(a.matrices.split(","), rows, a.rounds)
    ops.set_threads(a.threads)
    for name in a.models:
        path = resolve_model(name)
        lms = {lay: load_model(path, repack=lay == "x8") for lay in ("x8", "rows")}
        g = torch.Generator().manual_seed(1)
        ctx = torch.randint(0, lms["x8"].config.n_vocab, (100,), generator=g)
        caches = {}
        with torch.inference_mode():
            for (lay, lm), m in ((p, m) for p in lms.items() for m in rows):
                caches[lay, m] = lm.new_cache(100 + a.rounds * a.n * m + 64)
                lm.model.forward(ctx, caches[lay, m], "last")
            x = {m: torch.randint(0, 1000, (m,), generator=g) for m in rows}
            ms = {k: [] for k in caches}
            for r in range(a.rounds):
                for m in rows:
                    for lay in ("x8", "rows") if r % 2 == 0 else ("rows", "x8"):
                        t0 = time.perf_counter()
                        for _ in range(a.n):
                            lms[lay].model.forward(x[m], caches[lay, m], logits="all")
                        ms[lay, m].append((time.perf_counter() - t0) / a.n * 1e3)
        print(f"{name}: forward of M rows, median of {a.rounds} rounds x {a.n} (ms)")
        med = {k: statistics.median(v) for k, v in ms.items()}
        for m in rows:
            pair = statistics.median(p / q for p, q in zip(ms["x8", m], ms["rows", m]))
            print(f"  M={m}: x8 {med['x8', m]:.2f}  rows {med['rows', m]:.2f}  x8/rows {pair:.3f}"
                  f"  (vs M={rows[0]}: x8 {med['x8', m] / med['x8', rows[0]]:.2f}x, rows "
                  f"{med['rows', m] / med['rows', rows[0]]:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
