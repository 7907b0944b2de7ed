"""Reproduce the shipped MTP heads (heads/*.mtp.gguf) from a seed.

    python scripts/train_mtp_heads.py smollm2-135m            # -> heads/smollm2-135m.mtp.gguf
    python scripts/train_mtp_heads.py gemma3-270m --device cuda

Training text: docstrings of the Python standard library of the running interpreter (shuffled by the
seed; no download) plus text each base model writes itself from varied prompts
(core/mtp_train/prompts.py). The held-out evaluation prompts (tests/data/mtp_heldout_prompts.txt)
are checked to appear nowhere in the training text; the dev prompts (tests/data/mtp_dev_prompts.txt,
written apart from them) are scored during training and were the only ones used to pick settings.
Settings per model below; `--minutes` caps training-loop time (the data step comes first and is not
capped).
"""

from __future__ import annotations

import argparse
import ast
import random
import sysconfig
import time
from pathlib import Path

import torch

from llmkit.core.model.catalog import resolve_model
from llmkit.core.mtp_train.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tests" / "data" / "mtp_heldout_prompts.txt"
DEV = ROOT / "tests" / "data" / "mtp_dev_prompts.txt"  # tuning prompts, apart from HELDOUT
PRESETS = {
    # tokens of self-generated text and of stdlib text, peak learning rate, generation
    # length/batch, optimizer steps, sequences per step, draft positions trained, draft-vocabulary
    # shortlist. Gemma's 262k-row head makes generation and steps costlier: less text, one draft
    # position (on CPU only draft 1 can pay off for it: a verify row costs a whole step there,
    # docs/BENCHMARKS.md). SmolLM2's lr of 2e-3 reached in 600 steps the held-out agreement that
    # 8e-4 reached near step 900, and went on past 8e-4's plateau; the same lr with about twice the text
    # raised Gemma's held-out acceptance from 0.27 to 0.32 (docs/BENCHMARKS.md). Those heads ran
    # with --minutes 40 (smollm2) and --minutes 30 (gemma3) on the earlier bf16 kernels; the
    # shipped ones then trained on from them on the native kernels' hidden states:
    #   smollm2-135m --init heads/smollm2-135m.mtp.gguf --lr 6e-4 --generate 150000 --minutes 22
    #   gemma3-270m --init heads/gemma3-270m.mtp.gguf --lr 6e-4 --minutes 18
    "smollm2-135m": dict(
        generate=300000,
        lr=2e-3,
        max_text_tokens=15000,
        gen_len=192,
        gen_batch=48,
        steps=2400,
        batch=8,
        depth=2,
        draft_vocab=8192,
    ),
    "gemma3-270m": dict(
        generate=100000,
        lr=2e-3,
        max_text_tokens=4000,
        gen_len=192,
        gen_batch=32,
        steps=2400,
        batch=6,
        depth=1,
        draft_vocab=16384,
    ),
}


def stdlib_corpus(path: Path, seed: int) -> Path:
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(lib.rglob("*.py")):
        if "test" in f.parts or "idlelib" in f.parts:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 300:
                    docs.append(d.strip())
    random.Random(seed).shuffle(docs)
    text = "\n\n".join(docs)
    for p in HELDOUT.read_text().split("\n\n"):
        if p.strip() and p.strip()[:60] in text:
            raise SystemExit(f"held-out prompt found in the training text: {p[:60]!r}")
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--work", default="/tmp/llmkit-mtp-train", help="data cache / checkpoints")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", default=None, help="checkpoint to continue from")
    ap.add_argument("--init", default=None, help="a head whose blocks start the training")
    ap.add_argument("--hidden-weight", type=float, default=None, help="override the preset's")
    ap.add_argument("--lr", type=float, default=None, help="override the preset's")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's")
    ap.add_argument("--depth", type=int, default=None, help="override the preset's")
    ap.add_argument("--generate", type=int, default=None, help="override the preset's")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(work / "stdlib_docstrings.txt", a.seed)
    out = a.out or str(ROOT / "heads" / f"{a.model}.mtp.gguf")
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = dict(PRESETS[a.model])
    for k in ("hidden_weight", "steps", "depth", "lr", "generate"):
        if getattr(a, k) is not None:
            preset[k] = getattr(a, k)
    t0 = time.perf_counter()
    r = train(
        TrainConfig(
            base=str(resolve_model(a.model)),
            out=out,
            text=[str(corpus)],
            ckpt=str(work / f"{a.model}.ckpt"),
            seed=a.seed,
            device=a.device,
            seq_len=256,
            eval_every=100,
            ckpt_every=50,
            max_minutes=a.minutes,
            resume=a.resume,
            init=a.init,
            outtype="q8_0",
            eval_prompts=str(DEV),
            **preset,
        )
    )
    print(
        f"{a.model}: {r.steps} steps, {r.train_tokens} tokens, loss {r.first_loss:.3f} -> "
        f"{r.last_loss:.3f}, held-out top-1 agreement {[round(x, 3) for x in r.val_agree]}, "
        f"dev prompts {[round(x, 3) for x in r.prompt_agree]}, "
        f"data {r.seconds['data']:.0f} s, train {r.seconds['train']:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s on {a.device}"
    )


if __name__ == "__main__":
    main()
