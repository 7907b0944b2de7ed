"""llmkit and llama.cpp side by side on this CPU: speed, memory, kernels, MTP.

    python scripts/bench_cpu.py [MODEL ...] [-t 2] [-r 5] [-d 0] [--llama-python /tmp/lcpp/bin/python]
                                [--sections speed,rss,kernels,mtp] [--json out.json]

llama.cpp runs through llama-cpp-python (an optional dev dependency, source build; give the Python
that has it with --llama-python, default: this one). Sections:
  speed    llama-bench's pp512 / tg128 (-p / -n): two long-lived workers, one per engine, take
           turns repetition by repetition (so machine drift hits both), after one warm-up each.
           pp: one prompt of random tokens in ubatches of 512; tg: single-token steps after one
           token (-d D: after a D-token random context, llama-bench's "tg128 @ dD": how the
           attention over a long cache weighs), each repetition on a new cache. min / median
           tok/s and llmkit/llama.cpp ratios of the medians.
  rss      peak resident memory (wait4's ru_maxrss) of `llm run -n 16 -c 4096` greedy against a
           llama-cpp-python process doing the same (Llama(n_ctx=4096), 16 tokens), min of 2. Both
           include their Python interpreter and libraries; each engine's bare imports are measured
           too and the difference (the model, its KV cache and buffers) compared as well.
  kernels  scripts/bench_native_kernels.py --quick: per-kernel GB/s against measured read bandwidth.
  mtp      scripts/eval_mtp_heads.py: decode with the shipped MTP heads, draft 1-3, on the held-out
           prompts (-n 64, --mtp-reps repetitions), speedup over plain decode in the same run.
The CPU (/proc/cpuinfo), llmkit's ISA path and llama.cpp's version head the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# ---- workers: one process per engine, one repetition per stdin line ----


def _llmkit_worker(model: str, threads: int, n_prompt: int, n_gen: int, depth: int) -> None:
    import numpy as np

    from llmkit.core.decode.loop import no_grad
    from llmkit.core.lean.load import load_if_lean
    from llmkit.core.model.catalog import resolve_model
    from llmkit.kernels import native_abi

    native_abi.set_threads(threads)  # as `llm run -t` sets them
    # what `llm run` runs: the torch-free runtime (core/lean/), else the torch model
    lm = load_if_lean(resolve_model(model), 512)
    if lm is None:
        from llmkit.core.models.loader import load_model
        from llmkit.kernels import ops

        ops.set_threads(threads)
        lm = load_model(resolve_model(model))
    g = np.random.default_rng(0)

    def once() -> dict:
        with no_grad():
            toks = g.integers(0, lm.config.n_vocab, n_prompt).tolist()
            cache = lm.new_cache(n_prompt + 8)
            t0 = time.perf_counter()
            for s in range(0, n_prompt, 512):
                lm.model.forward(toks[s : s + 512], cache, logits="last")
            t_pp = time.perf_counter() - t0
            cache = lm.new_cache(depth + n_gen + 8)
            ctx = g.integers(0, lm.config.n_vocab, depth + 1).tolist()
            for s in range(0, depth + 1, 512):
                lm.model.forward(ctx[s : s + 512], cache, logits="last")
            t0 = time.perf_counter()
            for i in range(n_gen):
                lm.model.forward(toks[i + 1 : i + 2], cache, logits="last")
            t_tg = time.perf_counter() - t0
        return {
            "pp": n_prompt / t_pp,
            "tg": n_gen / t_tg,
            "name": lm.describe(),
            "isa": native_abi.isa(),
            "runtime": type(lm).__name__,
        }

    _serve(once)


def _llama_worker(model: str, threads: int, n_prompt: int, n_gen: int, depth: int) -> None:
    import random

    from llama_cpp import Llama, __version__

    path = _model_path(model)
    llm = Llama(model_path=path, n_ctx=max(n_prompt, depth + n_gen) + 16, n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
    rng = random.Random(0)

    def once() -> dict:
        toks = [rng.randrange(1000, llm.n_vocab()) for _ in range(max(n_prompt, n_gen + 1))]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks[:n_prompt])
        t_pp = time.perf_counter() - t0
        llm.reset()
        llm.eval([rng.randrange(1000, llm.n_vocab()) for _ in range(depth + 1)])
        t0 = time.perf_counter()
        for i in range(n_gen):
            llm.eval([toks[i + 1]])
        t_tg = time.perf_counter() - t0
        return {"pp": n_prompt / t_pp, "tg": n_gen / t_tg, "version": __version__}

    _serve(once)


def _serve(once) -> None:
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(once()), flush=True)


def _llama_rss(model: str, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=_model_path(model), n_ctx=4096, n_threads=threads, verbose=False)
    llm.create_completion(RSS_PROMPT, max_tokens=16, temperature=0.0)


def _model_path(model: str) -> str:
    """A known model name or a path: llama-cpp-python's interpreter may lack llmkit, so known
    names resolve to llmkit's cache directory (the models are fetched by llmkit first)."""
    if Path(model).exists():
        return model
    names = {
        "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
    }
    return str(Path.home() / ".cache" / "llmkit" / "models" / names[model])


# ---- driver ----


class Worker:
    def __init__(self, python: str, kind: str, model: str, a) -> None:
        cmd = [python, __file__, "--worker", kind, model, "-t", str(a.threads),
               "-p", str(a.n_prompt), "-n", str(a.n_gen), "-d", str(a.n_depth)]  # fmt: skip
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"a benchmark worker died (exit {self.p.wait()})")
        return json.loads(line)

    def rep(self) -> dict:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "all": xs}


def speed(model: str, a) -> dict:
    engines = {"llmkit": Worker(sys.executable, "llmkit", model, a),
               "llama.cpp": Worker(a.llama_python, "llama", model, a)}  # fmt: skip
    runs = {e: [] for e in engines}
    for r in range(a.reps + 1):  # repetition 0: warm-up, not counted
        for e, w in engines.items():
            res = w.rep()
            if r:
                runs[e].append(res)
    for w in engines.values():
        w.close()
    out = {"model": runs["llmkit"][0]["name"], "isa": runs["llmkit"][0]["isa"],
           "runtime": runs["llmkit"][0]["runtime"],
           "llama_cpp_version": runs["llama.cpp"][0]["version"]}  # fmt: skip
    for test in ("pp", "tg"):
        for e in engines:
            out[f"{e} {test}"] = _stats([x[test] for x in runs[e]])
        out[f"ratio {test}"] = out[f"llmkit {test}"]["median"] / out[f"llama.cpp {test}"]["median"]
    return out


# Runs argv[1:] as its grandchild and prints that process's peak RSS in KiB. A child spawned
# straight from this (torch-importing) process would inherit our memory's high-water mark in its
# ru_maxrss (Linux keeps the larger of the pre-exec image's and its own), so a small interpreter
# forks the measured command from its own small image.
_RSS_PROBE = """import os, sys
pid = os.fork()
if pid == 0:  # the command's output is not ours to print
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))"""


def _peak_rss_mib(cmd: list[str]) -> float:
    p = subprocess.run([sys.executable, "-S", "-c", _RSS_PROBE, *cmd], capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.decode()[-500:]}")
    return int(p.stdout.split()[-1]) / 1024  # KiB on Linux


def rss(model: str, a) -> dict:
    ours = [sys.executable, "-m", "llmkit.cli.app", "run", "-m", model, "-n", "16", "-c", "4096",
            "-t", str(a.threads), "--temp", "0", "-p", RSS_PROMPT]  # fmt: skip
    theirs = [a.llama_python, __file__, "--worker", "llama-rss", model, "-t", str(a.threads)]
    # what each process holds before any model: interpreter, the libraries `llm run` imports
    # (the torch-free runtime's: no torch) / llama.cpp's
    ours0 = [sys.executable, "-c", "import llmkit.cli.app, llmkit.core.api, llmkit.core.lean.load"]
    theirs0 = [a.llama_python, "-c", "import llama_cpp"]
    res = {"llmkit": [], "llama.cpp": [], "llmkit base": [], "llama.cpp base": []}
    for _ in range(2):
        res["llmkit"].append(_peak_rss_mib(ours))
        res["llama.cpp"].append(_peak_rss_mib(theirs))
        res["llmkit base"].append(_peak_rss_mib(ours0))
        res["llama.cpp base"].append(_peak_rss_mib(theirs0))
    out = {e: min(v) for e, v in res.items()}
    out["ratio"] = out["llmkit"] / out["llama.cpp"]
    out["model ratio"] = (out["llmkit"] - out["llmkit base"]) / (
        out["llama.cpp"] - out["llama.cpp base"]
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-d", "--n-depth", type=int, default=0, help="tg after this many tokens")
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--sections", default="speed,rss,kernels,mtp")
    ap.add_argument("--mtp-reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        model = a.models[0]
        if a.worker == "llmkit":
            return _llmkit_worker(model, a.threads, a.n_prompt, a.n_gen, a.n_depth)
        if a.worker == "llama":
            return _llama_worker(model, a.threads, a.n_prompt, a.n_gen, a.n_depth)
        return _llama_rss(model, a.threads)
    sections = set(a.sections.split(","))
    from llmkit.core.bench.report import cpu_name  # the workers may run without llmkit

    report = {"cpu": cpu_name(), "threads": a.threads, "models": {}}
    print(f"CPU: {report['cpu']}, {a.threads} threads")
    for m in a.models:
        rec = report["models"].setdefault(m, {})
        if "speed" in sections:
            s = rec["speed"] = speed(m, a)
            print(f"\n{s['model']} (llmkit isa {s['isa']}, {s['runtime']}; llama.cpp via llama-cpp-python "
                  f"{s['llama_cpp_version']}), {a.reps} repetitions, tok/s min / median:")  # fmt: skip
            for test, n in (("pp", a.n_prompt), ("tg", a.n_gen)):
                cells = [f"{e} {s[f'{e} {test}']['min']:7.1f} / {s[f'{e} {test}']['median']:7.1f}"
                         for e in ("llmkit", "llama.cpp")]  # fmt: skip
                at = f" @ d{a.n_depth}" if test == "tg" and a.n_depth else ""
                print(
                    f"  {test}{n}{at:<6} "
                    + "   ".join(cells)
                    + f"   ratio {s[f'ratio {test}']:.2f}x"
                )
        if "rss" in sections:
            r = rec["rss"] = rss(m, a)
            print(
                f"  peak RSS, run -n 16 -c 4096: llmkit {r['llmkit']:.0f} MiB, "
                f"llama.cpp {r['llama.cpp']:.0f} MiB, ratio {r['ratio']:.2f}x; above the bare "
                f"imports ({r['llmkit base']:.0f} / {r['llama.cpp base']:.0f} MiB): "
                f"{r['llmkit'] - r['llmkit base']:.0f} / {r['llama.cpp'] - r['llama.cpp base']:.0f}"
                f" MiB, ratio {r['model ratio']:.2f}x"
            )
    sys.stdout.flush()
    if "kernels" in sections:
        print()
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_native_kernels.py"), "--quick",
                        "-t", str(a.threads)], check=True)  # fmt: skip
    if "mtp" in sections:
        print()
        cmd = [sys.executable, str(ROOT / "scripts" / "eval_mtp_heads.py"), *a.models,
               "-n", "64", "-r", str(a.mtp_reps), "-t", str(a.threads)]  # fmt: skip
        subprocess.run(cmd, check=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
