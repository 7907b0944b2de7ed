"""Where an MTP round goes on the CPU: draft pass, target forward, LM head, the rest, against a
plain decoded token.

    python scripts/profile_mtp_round.py [MODEL] [--draft 1] [--branches 1] [-n 64] [-r 2] [-t 2]

For each held-out prompt (tests/data/mtp_heldout_prompts.txt) and repetition, plain greedy
decoding of `n` tokens and `--mtp` decoding of the same prompt run back to back on one load (so
the machine's drift hits both); the MTP run's drafter.draft, model.forward and model.lm_logits
are timed (the rest of a round: sampling, the acceptance rule, cache rollback, bookkeeping).
Prints ms per plain token, ms per round and its parts, acceptance and the speedup.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

from llmkit.core.decode.drafter import MTPDrafter
from llmkit.core.decode.loop import Speculation, generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.core.tokenizer import load_tokenizer
from llmkit.kernels import ops

HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mtp_heldout_prompts.txt"
PARTS = ("draft", "target forward", "LM head")


class Clock:
    """Seconds spent in wrapped callables while `on`."""

    def __init__(self):
        self.s, self.on = collections.Counter(), False

    def wrap(self, obj, attr: str, key: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if self.on:
                self.s[key] += time.perf_counter() - t0
            return out

        setattr(obj, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--draft", type=int, default=1)
    ap.add_argument("--branches", type=int, default=1)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    ops.set_threads(a.threads)
    lm = load_model(resolve_model(a.model), mtp=True)
    tok = load_tokenizer(lm.metadata)
    bos = [tok.bos_id] if tok.add_bos else []
    prompts = [bos + tok.encode(p, add_special=False, parse_special=False)
               for p in HELDOUT.read_text().split("\n\n") if p.strip()]  # fmt: skip
    clock = Clock()
    clock.wrap(lm.model, "forward", "target forward")
    clock.wrap(lm.model, "lm_logits", "LM head")
    totals = collections.Counter()

    def run(ids: list[int], mtp: bool) -> None:
        cache = lm.new_cache(len(ids) + a.n + 16)
        spec = None
        if mtp:
            drafter = MTPDrafter(lm.model.mtp, cache.n_ctx, cache.margin)
            clock.wrap(drafter, "draft", "draft")
            cfg = SpecConfig(draft=a.draft, branches=a.branches)
            spec = Speculation(drafter, cfg, SpecStats(cfg.draft, branches=cfg.branches))
        sampler = Sampler(SamplerParams(temp=0))
        gen = generate(lm.model, cache, ids, sampler, a.n + 1, ignore_eos=True, spec=spec)
        next(gen)  # the prompt: not timed
        clock.on = mtp
        t0 = time.perf_counter()
        n = sum(1 for _ in gen)
        totals["mtp s" if mtp else "plain s"] += time.perf_counter() - t0
        totals["mtp tokens" if mtp else "plain tokens"] += n
        clock.on = False
        if mtp:
            totals["rounds"] += spec.stats.drafts
            totals["accepted"] += spec.stats.accepted_tokens

    with torch.inference_mode():
        run(prompts[0], False)  # warm-up
        run(prompts[0], True)
        clock.s.clear()  # the parts and the totals both start after the warm-up
        totals.clear()
        for _ in range(a.reps):
            for ids in prompts:
                run(ids, False)
                run(ids, True)
    plain = totals["plain s"] / totals["plain tokens"] * 1e3
    per_tok = totals["mtp s"] / totals["mtp tokens"] * 1e3
    rounds = totals["rounds"]
    print(f"{lm.describe()}  threads {a.threads}  draft {a.draft}  branches {a.branches}  "
          f"({a.reps} x {len(prompts)} prompts, {a.n} tokens)")  # fmt: skip
    print(
        f"  plain {plain:.3f} ms/token; MTP {per_tok:.3f} ms/token: speedup {plain / per_tok:.3f}x"
    )
    print(f"  {rounds} rounds, accepted per round {totals['accepted'] / rounds:.3f}")
    parts = {k: clock.s[k] / rounds * 1e3 for k in PARTS}
    parts["the rest"] = totals["mtp s"] / rounds * 1e3 - sum(parts.values())
    for k, ms in parts.items():
        print(f"    {k:<15} {ms:6.3f} ms/round  ({ms / plain:.2f} plain tokens)")


if __name__ == "__main__":
    main()
