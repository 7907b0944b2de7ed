"""llama.cpp's own CPU speed on the same models, same protocol as scripts/bench_cpu.py (dev only).

Needs llama-cpp-python (a source build, ~20 min on 2 cores; not a dependency of llmkit):
    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/llvenv/bin/python scripts/bench_llama_cpp.py -t 2 ~/.cache/llmkit/models/*.gguf

pp: N random tokens evaluated in one n_batch=512 call; tg: N single-token evals (greedy not needed:
the same random token is fed back). KV cleared between repetitions; min / median tok/s.
"""

import argparse
import random
import statistics
import time

from llama_cpp import Llama, __version__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--flash-attn", action="store_true")
    a = ap.parse_args()
    for path in a.models:
        llm = Llama(
            model_path=path,
            n_ctx=a.n_prompt + a.n_gen + 16,
            n_batch=512,
            n_threads=a.threads,
            n_threads_batch=a.threads,
            flash_attn=a.flash_attn,
            verbose=False,
        )
        rng = random.Random(0)
        pp, tg = [], []
        for r in range(a.reps + 1):  # first repetition = warm-up
            toks = [rng.randrange(1000, llm.n_vocab()) for _ in range(a.n_prompt)]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks)
            t_pp = time.perf_counter() - t0
            llm.reset()
            llm.eval([toks[0]])
            t0 = time.perf_counter()
            for i in range(a.n_gen):
                llm.eval([toks[i + 1]])
            t_tg = time.perf_counter() - t0
            if r:
                pp.append(a.n_prompt / t_pp)
                tg.append(a.n_gen / t_tg)
        name = path.rsplit("/", 1)[-1]
        print(
            f"llama.cpp (llama-cpp-python {__version__}, fa={'on' if a.flash_attn else 'off'}) {name:<36} "
            f"threads {a.threads} pp{a.n_prompt}: min {min(pp):7.1f} median {statistics.median(pp):7.1f} tok/s | "
            f"tg{a.n_gen}: min {min(tg):6.1f} median {statistics.median(tg):6.1f} tok/s"
        )


if __name__ == "__main__":
    main()
