"""Native CPU matmul kernels (kernels/cpu_native.py) on the real models' shapes and types.

    python scripts/bench_native_kernels.py [-t 2] [-m 1,2,4,8,16,64,512] [--types Q4_1,Q8_0]
                                           [--quick] [--budget 0.5] [--isa avx2] [--no-pack] [--resident]

Prints the CPU (/proc/cpuinfo model name), the ISA path and the measured read bandwidth (1 GiB
read by the library's parallel read loop: the roof for M = 1; torch.sum for comparison), then per
(model, type, N x K) and M the median time of a call timed in C (cpu_timing.time_matmuls: the
calls back to back, as a decode step's one native call makes them; the M values of a row taken
in turns) and its rate: GB/s of weight
bytes for M <= 16 (the memory-bound regime), GFLOP/s (2 M N K) for M >= 64; then M = 4's time
over M = 1's, and M = 1 through Python (NativeLinear: the ctypes call and the output tensor
included). Weights are
several copies of the matrix, together >= 96 MB (3x the L3 of an EPYC), cycled call after call,
so M = 1 reads them from DRAM as decode does. The LM heads (49152x576, 262144x640 Q8_0) run only
M <= 16: prefill computes logits for one row. The read bandwidth is measured again at the end:
on a shared VM it drifts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.bench.report import cpu_name
from llmkit.kernels import cpu_native as cn
from llmkit.kernels import cpu_timing
from llmkit.quant.quantize import quantize

# (model, N, K, types): SmolLM2-135M (hidden 576, ffn 1536) and Gemma-3-270M (hidden 640, q 1024,
# ffn 2048). The 32-value types fit K = 576 / 640; the K-quants need K % 256 == 0.
SHAPES = [
    ("smollm2", 576, 576, ("Q4_1", "Q8_0", "Q5_0", "Q4_0")),
    ("smollm2", 1536, 576, ("Q4_1", "Q8_0", "Q5_0", "Q4_0")),
    ("smollm2", 576, 1536, ("Q4_1", "Q8_0", "Q4_K", "Q6_K")),
    ("smollm2", 49152, 576, ("Q8_0",)),
    ("gemma3", 1024, 640, ("Q5_0", "Q8_0", "Q4_1")),
    ("gemma3", 2048, 640, ("Q5_0", "Q8_0", "Q4_1")),
    ("gemma3", 640, 2048, ("Q4_K", "Q6_K", "Q8_0", "Q5_0")),
    ("gemma3", 262144, 640, ("Q8_0",)),
]
HEAD_ROWS = 32768  # an N this large is an LM head
L3_SPAN = 96 << 20


def read_bandwidth() -> tuple[float, float]:
    """GB/s reading 1 GiB: (the library's parallel read loop, torch.sum), best of 5 each."""
    a = torch.ones(1 << 28)  # 1 GiB, touched
    lib = cn.library()
    best = [float("inf"), float("inf")]
    for _ in range(5):
        t0 = time.perf_counter()
        lib.llk_read_probe(a.data_ptr(), a.numel() * 4)
        t1 = time.perf_counter()
        a.sum()
        t2 = time.perf_counter()
        best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
    return a.numel() * 4 / best[0] / 1e9, a.numel() * 4 / best[1] / 1e9


def make_weights(qtype: QT, n: int, k: int) -> torch.Tensor:
    """uint8 [N, row_bytes]: 256 quantized random rows tiled to N (valid blocks, cheap to make)."""
    base = quantize(torch.randn(256, k, generator=torch.Generator().manual_seed(0)) * 0.05, qtype)
    return base.repeat((n + 255) // 256, 1)[:n].contiguous()


def times_in_c(lins, xs: dict, budget_s: float, rounds: int = 5) -> dict:
    """Median seconds of a call timed in C per M (xs: M -> activations), over about `budget_s`
    of calls per M in `rounds` interleaved passes over the M values, so that the machine's drift
    within the cell hits every M alike (the M = 4 / M = 1 ratio)."""
    reps = {m: max(2, min(400, int(budget_s / rounds / max(statistics.median(
        cpu_timing.time_matmuls(lins, x, 5)), 1e-7)))) for m, x in xs.items()}  # fmt: skip
    ts: dict = {m: [] for m in xs}
    for _ in range(rounds):
        for m, x in xs.items():
            ts[m] += cpu_timing.time_matmuls(lins, x, reps[m])
    return {m: statistics.median(t) for m, t in ts.items()}


def time_calls(fn, copies, budget_s: float) -> tuple[float, float]:
    for i in range(3):
        fn(copies[i % len(copies)])
    ts: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < 5 or (time.perf_counter() < t_end and len(ts) < 2000):
        w = copies[len(ts) % len(copies)]
        t0 = time.perf_counter()
        fn(w)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-m", "--rows", default="1,2,4,8,16,64,512")
    ap.add_argument("--types", default="", help="comma-separated types (default: all listed)")
    ap.add_argument("--quick", action="store_true", help="skip the LM heads")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of calls per cell")
    ap.add_argument("--isa", default="best", help="force a path, e.g. scalar or avx2")
    ap.add_argument("--no-pack", action="store_true", help="weights as GGUF rows, not x8 groups")
    ap.add_argument("--resident", action="store_true",
                    help="one copy of each matrix, so it stays in cache: compute, not DRAM")  # fmt: skip
    args = ap.parse_args()
    if not cn.available():
        raise SystemExit(f"native kernels unavailable: {cn.unavailable_reason()}")
    cn.set_threads(args.threads)
    cn.set_isa(args.isa)
    torch.set_num_threads(args.threads)
    rows = [int(m) for m in args.rows.split(",")]
    only = {t.strip().upper() for t in args.types.split(",") if t.strip()}

    bw, bw_torch = read_bandwidth()
    print(f"CPU: {cpu_name()}, {args.threads} threads, path {cn.isa()}")
    print(f"read bandwidth of 1 GiB: {bw:.1f} GB/s (C read loop), {bw_torch:.1f} GB/s (torch.sum)")
    head = "model   type    shape          MB  " + "".join(f"{'M=' + str(m):>20s}" for m in rows)
    head += "  M=4/M=1  M=1 via Python" if 1 in rows and 4 in rows else ""
    print(head)
    print("-" * len(head))
    for model, n, k, types in SHAPES:
        if args.quick and n >= HEAD_ROWS:
            continue
        for name in types:
            if only and name not in only:
                continue
            qtype = QT[name]
            w0 = make_weights(qtype, n, k)
            nbytes = w0.numel()
            spare = 0 if args.resident else max(0, L3_SPAN // nbytes)
            copies = [w0] + [w0.clone() for _ in range(spare)]
            cells = []
            lins = [cn.NativeLinear([(c, qtype, (n, k))], pack=not args.no_pack) for c in copies]
            runs = [m for m in rows if n < HEAD_ROWS or m <= 16]
            med_of = times_in_c(lins, {m: torch.randn(m, k) for m in runs}, args.budget)
            for m in rows:
                if m not in med_of:
                    cells.append(f"{'-':>20s}")
                    continue
                med = med_of[m]
                rate = (
                    f"{nbytes / med / 1e9:5.1f}GB/s"
                    if m <= 16
                    else f"{2 * m * n * k / med / 1e9:4.0f}GF/s"
                )
                cells.append(f"{med * 1e6:9.0f}us {rate:>9s}")
            if 1 in med_of and 4 in med_of:
                x = torch.randn(1, k)
                py, _ = time_calls(lambda lin, x=x: lin(x), lins, args.budget)
                cells.append(
                    f"  {med_of[4] / med_of[1]:6.2f}x  {py * 1e6:5.0f}us {nbytes / py / 1e9:5.1f}GB/s"
                )
            print(f"{model:8s}{name:7s} {n:>6d}x{k:<5d} {nbytes / 1e6:6.1f}  " + "".join(cells))
            del copies
    bw_end, _ = read_bandwidth()  # shared VMs drift: the roof again, after the table
    print(f"read bandwidth of 1 GiB after the table: {bw_end:.1f} GB/s (C read loop)")
    print(f"(median of calls, about --budget {args.budget}s per cell; GB/s = weight bytes / time)")


if __name__ == "__main__":
    main()
