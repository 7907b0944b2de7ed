"""Evaluate the shipped MTP heads on held-out prompts with `llm bench` (acceptance per draft
position, mean accepted length, decode t/s with and without --mtp, draft 1-3) as one table.

    python scripts/eval_mtp_heads.py                       # both models, CPU, markdown tables
    python scripts/eval_mtp_heads.py smollm2-135m -r 3 --device cuda --json out.json

The prompts are tests/data/mtp_heldout_prompts.txt (one per paragraph), never used in training
(scripts/train_mtp_heads.py checks it). Each tg row greedily continues prompt rep mod P; the
repetitions cycle through the prompts, so use -r >= the number of prompts for the full set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tests" / "data" / "mtp_heldout_prompts.txt"
MODELS = ("smollm2-135m", "gemma3-270m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("-n", default="64", help="generated tokens per tg row")
    ap.add_argument("-r", default="10", help="repetitions (prompts cycle)")
    ap.add_argument("-t", default="2", help="threads")
    ap.add_argument("--draft", default="1,2,3")
    ap.add_argument("--p-min", default="0", help="--draft-p-min values (comma list)")
    ap.add_argument("--branches", default="1", help="--draft-branches values (comma list)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the JSON records here")
    a = ap.parse_args()
    base = [sys.executable, "-m", "llmkit.cli.app", "bench"]
    for m in a.models:
        base += ["-m", m]
    base += ["-p", "0", "-n", a.n, "-r", a.r, "-t", a.t, "--mtp", "0,1", "--draft", a.draft]
    base += ["--draft-p-min", a.p_min, "--draft-branches", a.branches]
    base += ["--prompt-file", str(HELDOUT), "--device", a.device]
    res = subprocess.run([*base, "-o", "json"], check=True, stdout=subprocess.PIPE, text=True)
    if a.json:
        Path(a.json).write_text(res.stdout)
    print("| model | mtp | draft | p_min | branches | tg t/s | accept/pos | acc len | speedup | "
          "paired |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in json.loads(res.stdout):
        if r.get("n_gen", 0) == 0:
            continue
        pos = r.get("acceptance_per_position")
        pos = "/".join(f"{x:.2f}" for x in pos) if pos else "-"
        acc = f"{r['mean_accepted_length']:.2f}" if r.get("mean_accepted_length") else "-"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        paired = f"{r['speedup_paired']:.2f}x" if r.get("speedup_paired") else "-"
        print(
            f"| {r['model_type']} | {r['mtp']} | {r.get('n_draft') or '-'} | "
            f"{'-' if r.get('draft_p_min') is None else r['draft_p_min']} | "
            f"{r.get('draft_branches') or '-'} | "
            f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} | {pos} | {acc} | {sp} | {paired} |"
        )


if __name__ == "__main__":
    main()
