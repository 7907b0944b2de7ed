"""Aggregate throughput and per-request latency of `llm serve` at several slot counts.

    python scripts/bench_serve.py -m smollm2-135m --np 1,2,4,8 -n 32 -r 2
    python scripts/bench_serve.py -m step35.gguf --mtp --draft 3 --np 1,2,4,8

For each -np value a server runs in this process on a loopback port; `np` clients each send `-r`
non-streamed greedy completions (distinct prompts, cache_prompt off so prefix sharing does not
flatter the figures, ignore_eos so every request generates exactly -n tokens) at the same time.
Reported: aggregate generated tok/s over the wall time of the whole round, per-request latency
(mean / max), and with --mtp the draft acceptance and what the draft policy chose. Figures are
printed as a markdown table and optionally written as JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.core.serve.engine import ServeOptions
from llmkit.core.serve.server import HttpOptions, Server
from llmkit.core.tokenizer import load_tokenizer

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def prompt(client: int, i: int, n_words: int) -> str:
    return f"Story {client}-{i}: " + " ".join(
        WORDS[(client * 7 + i + k) % len(WORDS)] for k in range(n_words)
    )


def run_round(url: str, n_clients: int, reps: int, n_predict: int, n_words: int) -> dict:
    def client(c: int) -> list[float]:
        lat = []
        with httpx.Client(base_url=url, timeout=600) as h:
            for i in range(reps):
                body = {
                    "prompt": prompt(c, i, n_words),
                    "max_tokens": n_predict,
                    "temperature": 0,
                    "ignore_eos": True,
                    "cache_prompt": False,
                }
                t0 = time.perf_counter()
                r = h.post("/v1/completions", json=body)
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == n_predict
                lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n_clients) as ex:
        lats = [x for lat in ex.map(client, range(n_clients)) for x in lat]
    wall = time.perf_counter() - t0
    return {
        "np": n_clients,
        "requests": len(lats),
        "wall_s": wall,
        "agg_tok_per_s": len(lats) * n_predict / wall,
        "latency_mean_s": statistics.mean(lats),
        "latency_max_s": max(lats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--np", default="1,2,4,8", help="slot counts to measure")
    ap.add_argument("-n", "--n-predict", type=int, default=32)
    ap.add_argument("-r", "--reps", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--draft", type=int, default=3)
    ap.add_argument("--draft-policy", default="adaptive")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    lm = load_model(path, mtp=a.mtp)
    tok = load_tokenizer(lm.metadata)
    rows = []
    for n in (int(x) for x in a.np.split(",")):
        opts = ServeOptions(
            n_slots=n,
            n_ctx=a.ctx_size,
            mtp=a.mtp,
            draft=a.draft,
            draft_policy=a.draft_policy,
        )
        server = Server(lm, tok, opts, HttpOptions(port=0), path.stem).start()
        try:
            run_round(server.url, 1, 1, 4, a.prompt_words)  # warm-up
            row = run_round(server.url, n, a.reps, a.n_predict, a.prompt_words)
            snap = httpx.get(server.url + "/slots").json()
            if a.mtp:
                spec = [s["speculative"] for s in snap["slots"]]
                drafted = sum(s["draft_tokens"] for s in spec)
                row["acceptance"] = sum(s["accepted_tokens"] for s in spec) / max(1, drafted)
                row["draft_policy"] = snap["draft_policy"].get("n_draft")
        finally:
            server.stop()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    mode = f"MTP draft {a.draft} ({a.draft_policy})" if a.mtp else "no MTP"
    print(f"\nmodel {path.name}, {mode}, {a.n_predict} tokens per request, {a.reps} per client\n")
    extra = " acceptance | policy draft |" if a.mtp else ""
    print("| -np | requests | agg tok/s | latency mean s | latency max s |" + extra)
    print("|---|---|---|---|---|" + ("---|---|" if a.mtp else ""))
    for r in rows:
        line = (
            f"| {r['np']} | {r['requests']} | {r['agg_tok_per_s']:.1f} | "
            f"{r['latency_mean_s']:.2f} | {r['latency_max_s']:.2f} |"
        )
        if a.mtp:
            line += f" {r['acceptance']:.2f} | {r['draft_policy']} |"
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"model": str(path), "mtp": a.mtp, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
