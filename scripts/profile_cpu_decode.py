"""Where a CPU decode step goes: time inside the native kernels vs. Python and op dispatch.

    python scripts/profile_cpu_decode.py [MODEL ...] [-t 2] [--depth 100] [-n 64] [-r 5] [--no-repack]
                                         [--rows 1,2,4,8] [--runtime lean|torch]

For each model, on the runtime `llm run` takes (the torch-free one, core/lean/, where it can;
--runtime torch: the torch model): a `depth`-token random context is prefilled, then `n` greedy
single-token steps (forward with last-position logits + the greedy sampler's argmax, as `llm run`
decodes) are timed: the step time.
Alternating with those plain runs, the same steps run with every native entry point wrapped in a
timer (kernels/cpu_native's matmul/linear and the library's row ops and attention): time inside
those calls per step, per entry point, with call counts. "Outside the kernels" = the instrumented
run's step time - its time inside - the wrappers' own cost (measured on a no-op call): the
Python, tensor-allocation and ctypes cost of a step. `r` repetitions, min / median.
--rows: also the cost of one forward over M rows (an MTP verify batch: logits for every row)
against M = 1, same protocol (the cache grows by M per step from `depth`).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np
import torch

from llmkit.core.decode.loop import no_grad
from llmkit.core.decode.sampling import argmax, host
from llmkit.core.lean.load import load_if_lean
from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.kernels import cpu_block, cpu_native

ROW_OPS = (
    "llk_rms_norm",
    "llk_rope",
    "llk_glu",
    "llk_kv_store",
    "llk_attention",
    "llk_attend",
    "llk_argmax",
    "llk_embed_rows",
    "llk_linear",  # the torch-free runtime's LM head (the torch path's: cpu_native._LINEAR)
    "llk_stack_run",  # the torch-free runtime's blocks (the torch path's: cpu_block._STACK)
)


class Timers:
    """Wraps the native entry points; accumulates ns and calls per name."""

    def __init__(self):
        self.ns = collections.Counter()
        self.calls = collections.Counter()
        self._saved = []

    def _wrap(self, name, fn):
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args):
            t0 = clock()
            rc = fn(*args)
            ns[name] += clock() - t0
            calls[name] += 1
            return rc

        return timed

    def install(self):
        lib = cpu_native.library()
        for name in ROW_OPS:
            self._saved.append((lib, name, getattr(lib, name)))
            setattr(lib, name, self._wrap(name, getattr(lib, name)))
        for mod, glob, name in (
            (cpu_native, "_MATMUL", "llk_matmul"),
            (cpu_native, "_LINEAR", "llk_linear"),
            (cpu_block, "_RUN", "llk_block_run"),  # a whole block: its linears and attention
            (cpu_block, "_STACK", "llk_stack_run"),  # every block of a step in one call
        ):
            self._saved.append((mod, glob, getattr(mod, glob)))
            setattr(mod, glob, self._wrap(name, getattr(mod, glob)))

    def remove(self):
        for obj, name, fn in reversed(self._saved):
            setattr(obj, name, fn)
        self._saved.clear()

    def reset(self):
        self.ns.clear()
        self.calls.clear()


def _ids(g, lm, n: int) -> list[int]:
    return g.integers(0, lm.config.n_vocab, n).tolist()


def rows_ms(lm, depth: int, n: int, m: int) -> float:
    """ms per forward of m rows (logits for all) after a `depth`-token context."""
    g = np.random.default_rng(1)
    cache = lm.new_cache(depth + n * m + 8)
    lm.model.forward(_ids(g, lm, depth), cache, "last")
    x = _ids(g, lm, m)
    t0 = time.perf_counter()
    for _ in range(n):
        lm.model.forward(x, cache, logits="all")
    return (time.perf_counter() - t0) * 1e3 / n


def decode_ms(lm, depth: int, n: int, on_start=lambda: None) -> float:
    """ms/token of `n` greedy steps after a `depth`-token random context. The cache is built
    here, so layer-bound native calls see the wrappers when they are installed."""
    g = np.random.default_rng(0)
    cache = lm.new_cache(depth + n + 8)
    tok = [argmax(host(lm.model.forward(_ids(g, lm, depth), cache, logits="last").logits[-1]))]
    on_start()  # the clock (and the counters) start after the context's prefill
    t0 = time.perf_counter()
    for _ in range(n):
        tok = [argmax(host(lm.model.forward(tok, cache, logits="last").logits[-1]))]
    return (time.perf_counter() - t0) * 1e3 / n


def wrapper_cost_us() -> float:
    """What a timing wrapper adds to a call, measured on a no-op native call."""
    lib = cpu_native.library()
    bare = lib.llk_get_threads
    t = Timers()
    wrapped = t._wrap("noop", bare)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        bare()
    t1 = time.perf_counter()
    for _ in range(n):
        wrapped()
    t2 = time.perf_counter()
    return max(0.0, ((t2 - t1) - (t1 - t0)) / n * 1e6)


def verify_cost(lm, depth: int, n: int, reps: int, rows: list[int]) -> None:
    runs = {m: [] for m in rows}
    with no_grad():
        for _ in range(reps):  # sizes interleaved: drift hits all of them
            for m in rows:
                runs[m].append(rows_ms(lm, depth, n, m))
    base = statistics.median(runs[rows[0]])
    cells = [f"M={m}: {min(v):.2f} / {statistics.median(v):.2f} ms ({statistics.median(v) / base:.2f}x)"
             for m, v in runs.items()]  # fmt: skip
    print("  forward of M rows, min / median: " + "; ".join(cells))


def profile(path, threads: int, depth: int, n: int, reps: int, rows: list[int],
            repack: bool = True, runtime: str = "lean") -> None:  # fmt: skip
    """Plain and instrumented runs alternate; "outside" comes from the instrumented run itself
    (its step time minus the time inside the native calls minus the wrappers' own cost)."""
    cpu_native.set_threads(threads)
    torch.set_num_threads(1)  # beside the native pool, as `llm run` sets it (kernels/ops.py)
    lm = load_if_lean(path, 512, repack) if runtime == "lean" else None
    lm = lm or load_model(path, repack=repack)
    timers = Timers()
    steps, outside, per_call = [], [], wrapper_cost_us()
    with no_grad():
        decode_ms(lm, depth, 8)  # warm-up
        for _ in range(reps):
            steps.append(decode_ms(lm, depth, n))
            timers.install()
            try:
                wrapped = decode_ms(lm, depth, n, timers.reset)
            finally:
                timers.remove()
            calls = sum(timers.calls.values()) / n
            inside = sum(timers.ns.values()) / 1e6 / n
            outside.append(wrapped - inside - calls * per_call / 1e3)
    step, out = statistics.median(steps), statistics.median(outside)
    print(f"{lm.describe()}  {type(lm).__name__}  threads {threads}  depth {depth}  "
          f"isa {cpu_native.isa()}  ({reps} x {n} steps; min / median)")  # fmt: skip
    print(f"  step {min(steps):.3f} / {step:.3f} ms/token; {calls:.0f} native calls per step "
          f"(timing wrapper {per_call:.2f} us/call, subtracted)")  # fmt: skip
    for name, ns in timers.ns.most_common():  # the last instrumented run
        c = timers.calls[name] / n
        print(f"    {name:<14} {ns / 1e6 / n:7.3f} ms/step  {c:5.0f} calls  "
              f"{ns / 1e3 / timers.calls[name]:7.1f} us/call")  # fmt: skip
    print(f"  outside the kernels (Python, allocation, dispatch): {min(outside):.3f} / {out:.3f} "
          f"ms/token = {out / step:.0%} of the median step")  # fmt: skip
    if rows:
        verify_cost(lm, depth, n, reps, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--rows", default="", help="M values for the verify-batch cost, e.g. 1,2,4,8")
    ap.add_argument("--no-repack", action="store_true", help="weights as GGUF rows (no x8 groups)")
    ap.add_argument("--runtime", choices=("lean", "torch"), default="lean",
                    help="lean: the torch-free runtime where it can run the model (llm run's)")  # fmt: skip
    a = ap.parse_args()
    rows = [int(x) for x in a.rows.split(",") if x]
    for m in a.models:
        profile(resolve_model(m), a.threads, a.depth, a.n, a.reps, rows, not a.no_repack,
                a.runtime)  # fmt: skip


if __name__ == "__main__":
    main()
