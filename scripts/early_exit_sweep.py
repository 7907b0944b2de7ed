"""Sweep `--spec early-exit`: acceptance and decode tokens/s over exit layers L and draft lengths N.

    python scripts/early_exit_sweep.py -m smollm2-135m --layers 8,16,24 --drafts 1,2,3 -r 3

Greedy decoding of one prompt (-n tokens). Every (L, N) row checks that the output is the plain
output (lossless) and reports the acceptance rate, the acceptance per draft position, the mean
accepted length, and min / median over -r repetitions of the decode tok/s and of the speedup, each
repetition timing plain decoding and then early exit back to back (acceptance is deterministic;
only the timings vary, and on a shared machine the load drifts between rows). A JSON
line per row goes to stdout; `--json FILE` also writes them all.
"""

from __future__ import annotations

import argparse
import json
import statistics

from llmkit.cli.common import set_threads
from llmkit.core.decode.early_exit import early_exit_spec
from llmkit.core.decode.loop import GenStats, generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig
from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.core.tokenizer import load_tokenizer

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg"
)


def run(lm, ids, n, L=None, k=0):
    cache = lm.new_cache(len(ids) + n + 8, margin=64)
    spec = early_exit_spec(lm.model, cache, L, SpecConfig(draft=k)) if L else None
    gen = GenStats()
    out = list(generate(lm.model, cache, ids, Sampler(SamplerParams(temp=0)), n, stats=gen,
                        spec=spec))  # fmt: skip
    return out, gen, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--layers", required=True, help="comma-separated exit layers L")
    ap.add_argument("--drafts", default="1,2,3", help="comma-separated draft lengths N")
    ap.add_argument("-n", type=int, default=64, help="tokens to generate")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-p", "--prompt", default=PROMPT)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args()
    set_threads(a.threads)
    lm = load_model(resolve_model(a.model))
    ids = load_tokenizer(lm.metadata).encode(a.prompt, add_special=True, parse_special=True)
    base_out = run(lm, ids, a.n)[0]
    rows = []
    for L in map(int, a.layers.split(",")):
        for k in map(int, a.drafts.split(",")):
            plain, spec_tps, ratios = [], [], []
            for _ in range(a.repetitions):  # back to back: the load of a shared machine drifts
                plain.append(run(lm, ids, a.n)[1].decode_tok_per_s)
                out, gen, spec = run(lm, ids, a.n, L, k)
                spec_tps.append(gen.decode_tok_per_s)
                ratios.append(spec_tps[-1] / plain[-1])
            d = spec.stats.to_dict(gen.generated_tokens)
            rows.append({
                "model": lm.path.name, "n_layer": lm.config.n_layer, "L": L, "draft": k,
                "tok_s_min": min(spec_tps), "tok_s_median": statistics.median(spec_tps),
                "plain_tok_s_min": min(plain), "plain_tok_s_median": statistics.median(plain),
                "speedup_min": min(ratios), "speedup_median": statistics.median(ratios),
                "lossless": out == base_out,
                **{key: d[key] for key in ("acceptance_rate", "acceptance_per_position",
                                           "mean_accepted_length")},
            })  # fmt: skip
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
