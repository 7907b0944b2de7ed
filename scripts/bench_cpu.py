"""CPU speed of the two real models, llama-bench style: pp512 and tg128 at a given thread count.

    python scripts/bench_cpu.py [-t 2] [-r 3] [--dtype bf16|f32] [MODEL ...]

pp: one prompt of N random tokens (BOS first) evaluated in ubatches of 512; tg: N single-token decode
steps after one warm-up token. Each repetition starts from an empty KV cache. Prints min / median
tokens per second over the repetitions, plus achieved weight bandwidth for tg (bytes of prepared
weights read per token; the tied/output head counts once).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model


def bench(path, threads, reps, n_prompt, n_gen, dtype):
    torch.set_num_threads(threads)
    lm = load_model(path, weight_dtype=dtype)
    n_vocab = lm.config.n_vocab
    g = torch.Generator().manual_seed(0)
    pp, tg = [], []
    with torch.inference_mode():
        for r in range(reps + 1):  # first repetition = warm-up, not counted
            toks = torch.randint(0, n_vocab, (n_prompt,), generator=g)
            cache = lm.new_cache(n_prompt + n_gen + 8)
            t0 = time.perf_counter()
            for s in range(0, n_prompt, 512):
                lm.model.forward(toks[s : s + 512], cache)
            t_pp = time.perf_counter() - t0
            cache = lm.new_cache(n_gen + 8)
            tok = torch.tensor([1])
            lm.model.forward(tok, cache)
            t0 = time.perf_counter()
            for _ in range(n_gen):
                tok = lm.model.forward(tok, cache).logits[0].argmax().view(1)
            t_tg = time.perf_counter() - t0
            if r:
                pp.append(n_prompt / t_pp)
                tg.append(n_gen / t_tg)
    wbytes = lm.backend.linear_bytes
    med_tg = statistics.median(tg)
    print(
        f"{lm.describe():<24} threads {threads} weights {str(dtype)[6:]:<8} "
        f"pp{n_prompt}: min {min(pp):7.1f} median {statistics.median(pp):7.1f} tok/s | "
        f"tg{n_gen}: min {min(tg):6.1f} median {med_tg:6.1f} tok/s "
        f"({wbytes * med_tg / 1e9:5.1f} GB/s of {wbytes / 2**20:.0f} MiB of weights read)"
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    for m in a.models:
        bench(resolve_model(m), a.threads, a.reps, a.n_prompt, a.n_gen, dtype)


if __name__ == "__main__":
    main()
