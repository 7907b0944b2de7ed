"""Where a CPU decode step goes: time inside the native kernels vs. Python and op dispatch.

    python scripts/profile_cpu_decode.py [MODEL ...] [-t 2] [--depth 100] [-n 64] [-r 5]

For each model: a `depth`-token random context is prefilled, then `n` greedy single-token steps
(forward with last-position logits + argmax, as `llm run` decodes) are timed, `r` times; the
median ms/token is the step time. Then the same steps run with every native entry point wrapped in
a timer (kernels/cpu_native's matmul/linear and the library's row ops and attention): the summed
time inside those calls per step, per entry point, with call counts. "Outside the kernels" =
step time - time inside; it is the Python, tensor-allocation and dispatch cost the issue's <1 ms
target is about. The wrappers add their own ~0.3 us per call, charged to the inside.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.kernels import cpu_native

ROW_OPS = ("llk_rms_norm", "llk_rope", "llk_glu", "llk_kv_store", "llk_attention", "llk_attend")


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
        for glob, name in (("_MATMUL", "llk_matmul"), ("_LINEAR", "llk_linear")):
            self._saved.append((cpu_native, glob, getattr(cpu_native, glob)))
            setattr(cpu_native, glob, self._wrap(name, getattr(cpu_native, glob)))

    def remove(self):
        for obj, name, fn in reversed(self._saved):
            setattr(obj, name, fn)
        self._saved.clear()

    def reset(self):
        self.ns.clear()
        self.calls.clear()


def decode_ms(lm, depth: int, n: int, reps: int) -> list[float]:
    """Median-able list of ms/token over `reps` runs of `n` greedy steps after `depth` tokens.
    The cache is built here, so layer-bound native calls see the wrappers when installed."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(reps):
        cache = lm.new_cache(depth + n + 8)
        ctx = torch.randint(0, lm.config.n_vocab, (depth,), generator=g)
        tok = lm.model.forward(ctx, cache, logits="last").logits[-1].argmax().view(1)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = lm.model.forward(tok, cache, logits="last").logits[-1].argmax().view(1)
        out.append((time.perf_counter() - t0) * 1e3 / n)
    return out


def profile(path, threads: int, depth: int, n: int, reps: int) -> None:
    cpu_native.set_threads(threads)
    torch.set_num_threads(threads)
    lm = load_model(path)
    with torch.inference_mode():
        decode_ms(lm, depth, 8, 1)  # warm-up
        step = statistics.median(decode_ms(lm, depth, n, reps))
        timers = Timers()
        timers.install()
        try:
            decode_ms(lm, depth, 4, 1)
            timers.reset()
            wrapped = statistics.median(decode_ms(lm, depth, n, reps))
        finally:
            timers.remove()
    steps = n * reps
    inside = sum(timers.ns.values()) / 1e6 / steps
    calls = sum(timers.calls.values()) / steps
    print(f"{lm.describe()}  threads {threads}  depth {depth}  isa {cpu_native.isa()}")
    print(f"  step {step:.3f} ms/token (with timers {wrapped:.3f}); {calls:.0f} native calls/step")
    for name, ns in timers.ns.most_common():
        c = timers.calls[name] / steps
        print(f"    {name:<14} {ns / 1e6 / steps:7.3f} ms/step  {c:5.0f} calls  "
              f"{ns / 1e3 / timers.calls[name]:7.1f} us/call")  # fmt: skip
    print(f"  inside the kernels {inside:.3f} ms; outside (Python, allocation, dispatch) "
          f"{step - inside:.3f} ms/token = {(step - inside) / step:.0%} of the step")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=5)
    a = ap.parse_args()
    for m in a.models:
        profile(resolve_model(m), a.threads, a.depth, a.n, a.reps)


if __name__ == "__main__":
    main()
