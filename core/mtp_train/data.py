"""Training data for NextN self-distillation: token sequences with the frozen trunk's hidden states
and its top-k next-token distribution per position, computed once and cached on disk.

Two sources: the user's text files (chunked, BOS first, evaluated by the trunk's own `forward`
with their hidden states), and text the base model writes itself from varied prompts (batched generation,
`batchgen.py`), whose hidden states and logits are kept from the generation passes themselves.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.core.mtp_train.batchgen import BatchedTrunk, topk_teacher
from llmkit.core.mtp_train.prompts import make_prompts
from llmkit.core.mtp_train.streams import Batch
from llmkit.core.outputs import atomic_output
from llmkit.errors import LlmkitError


@dataclass
class Sequence:
    tokens: torch.Tensor  # [T] int64
    hidden: torch.Tensor  # [T, H] fp32
    top_ids: torch.Tensor  # [T, k] int32
    top_logits: torch.Tensor  # [T, k] fp16
    lse: torch.Tensor  # [T] fp32
    source: str  # "text" | "generated" | "prompt" (an evaluation prompt's greedy continuation)
    start: int = 0  # rows before it are context only: not scored (an evaluation prompt's tokens)


def read_texts(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(Path(p).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise LlmkitError(f"cannot read --text {p}: {e.strerror or e}") from None
    return out


def paragraphs(texts: list[str], min_chars: int = 80) -> list[str]:
    paras = []
    for t in texts:
        paras += [p.strip() for p in re.split(r"\n\s*\n", t) if len(p.strip()) >= min_chars]
    return paras


def text_sequences(lm, tok, texts: list[str], seq_len: int, k: int, max_tokens: int, log):
    """Chunk the texts into BOS-first sequences of <= seq_len tokens; teacher pass on each."""
    ids: list[int] = []
    for para in paragraphs(texts, min_chars=1):  # tokenize only as much text as is used
        if len(ids) >= max_tokens:
            break
        ids += tok.encode(para + "\n\n", add_special=False, parse_special=False)
    if tok.bos_id is not None and tok.add_bos:
        bos, body = [tok.bos_id], seq_len - 1
    else:
        bos, body = [], seq_len
    out, done = [], 0
    with torch.inference_mode():
        for s in range(0, len(ids), body):
            if done >= max_tokens:
                break
            chunk = bos + ids[s : s + body]
            if len(chunk) < 16:
                continue
            t = torch.tensor(chunk)
            logits, h = lm.model.forward(t, lm.new_cache(len(chunk), margin=16), "all")
            top_ids, top_logits, lse = topk_teacher(logits, k)
            out.append(Sequence(t, h.clone(), top_ids, top_logits, lse, "text"))
            done += len(chunk)
            if len(out) % 10 == 0:
                log(f"teacher pass: {done} text tokens")
    return out


def generated_sequences(lm, tok, paras, n_tokens: int, n_new: int, batch: int, k: int, seed, log):
    """About n_tokens of the base model's own text: batches of prompts (paragraph openings and
    chat-style requests), each continued for n_new tokens at temperature 0 (3 in 5), 0.7 or 1.0."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    trunk = BatchedTrunk(lm)
    out, done = [], 0
    while done < n_tokens:
        prompts = make_prompts(lm, tok, paras, batch, rng)
        # mostly greedy: acceptance is measured on the model's greedy continuations
        temps = [rng.choice((0.0, 0.0, 0.0, 0.7, 1.0)) for _ in prompts]
        for g in trunk.generate(prompts, n_new, temps, gen, tok.is_eog, k):
            out.append(Sequence(g.tokens, g.hidden, *g.logits_topk, "generated"))
            done += g.tokens.numel()
        log(f"self-generation: {done}/{n_tokens} tokens")
    return out


def prompt_sequences(lm, tok, prompts: list[str], n_new: int, k: int) -> list[Sequence]:
    """Greedy continuations (n_new tokens) of evaluation prompts, with the teacher data; only the
    continuation is scored (`start`), as acceptance is measured on what the model generates."""
    ids = [tok.encode(p, add_special=True, parse_special=False) for p in prompts]
    gen = BatchedTrunk(lm).generate(ids, n_new, [0.0] * len(ids), torch.Generator(), tok.is_eog, k)
    return [
        Sequence(g.tokens, g.hidden, *g.logits_topk, "prompt", start=len(p))
        for g, p in zip(gen, ids, strict=True)
    ]


def draft_vocab(seqs: list[Sequence], n: int, n_vocab: int) -> tuple[torch.Tensor | None, float]:
    """The n token ids the teacher most often ranks first (sorted ids) and the share of positions
    whose teacher argmax they cover; (None, 1.0) when n is 0 or not below the vocabulary. Drafting
    over this shortlist multiplies n rows of the output matrix instead of all of them."""
    if n <= 0 or n >= n_vocab:
        return None, 1.0
    top1 = torch.cat([s.top_ids[:, 0].long() for s in seqs])
    counts = torch.bincount(top1, minlength=n_vocab)
    ids = torch.argsort(-counts, stable=True)[:n].sort().values  # ties: lower ids first
    return ids.int(), float(counts[ids].sum()) / max(1, top1.numel())


def to_batch(seqs: list[Sequence]) -> Batch:
    """Right-pad sequences into one Batch."""
    B, T = len(seqs), max(s.tokens.numel() for s in seqs)
    H, k = seqs[0].hidden.shape[1], seqs[0].top_ids.shape[1]
    tokens = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)  # rows the loss / agreement scores
    hidden = torch.zeros(B, T, H)
    ids = torch.zeros(B, T, k, dtype=torch.long)
    tl = torch.zeros(B, T, k)
    lse = torch.zeros(B, T)
    for i, s in enumerate(seqs):
        n = s.tokens.numel()
        tokens[i, :n], valid[i, s.start : n], hidden[i, :n] = s.tokens, True, s.hidden
        ids[i, :n], tl[i, :n], lse[i, :n] = s.top_ids.long(), s.top_logits.float(), s.lse
    return Batch(tokens, valid, hidden, ids, tl, lse)


def save_sequences(path: Path, seqs: list[Sequence], meta: dict, inputs=()) -> None:
    """Atomic (`core/outputs.py`); `inputs` (the base model, the texts) are never replaced."""
    with atomic_output(path, inputs) as tmp:
        torch.save({"meta": meta, "seqs": [vars(s) for s in seqs]}, tmp)


def load_sequences(path: Path) -> tuple[list[Sequence], dict]:
    try:
        d = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise LlmkitError(f"cannot read training data cache {path}: {e}") from None
    return [Sequence(**s) for s in d["seqs"]], d["meta"]
