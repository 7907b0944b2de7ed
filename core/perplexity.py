"""Perplexity and KL divergence as llama-perplexity computes them.

The text is tokenized once (with BOS if the model adds one), cut into chunks of n_ctx tokens; each
chunk is evaluated from an empty cache with its first token replaced by BOS (when the model adds BOS),
and only the second half is scored: tokens first..n_ctx-2 predict tokens first+1..n_ctx-1, with
first = n_ctx / 2 (the first half only provides context). PPL = exp(mean NLL); the uncertainty is
llama.cpp's: sqrt(var(NLL) / (N - 1)) * PPL.

KL divergence: a base run saves the scored rows' log-probabilities (fp16) to a file; a later run
against that file reports the mean KL(base || this model), its uncertainty, and top-1 agreement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmkit.core.outputs import atomic_output
from llmkit.errors import LlmkitError


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    n_tokens: int = 0  # scored tokens
    nll: float = 0.0
    nll2: float = 0.0
    chunk_ppl: list[float] = field(default_factory=list)
    kld: list[float] = field(default_factory=list)  # per scored token, when comparing to a base
    same_top1: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n_tokens)

    @property
    def ppl_error(self) -> float:
        n, mean = self.n_tokens, self.nll / self.n_tokens
        var = self.nll2 / n - mean * mean
        return math.sqrt(var / (n - 1)) * self.ppl if var > 0 and n > 1 else 0.0

    def kld_summary(self) -> dict | None:
        if not self.kld:
            return None
        k = np.array(self.kld)
        return {
            "mean_kld": float(k.mean()),
            "mean_kld_error": float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else 0.0,
            "max_kld": float(k.max()),
            "same_top1": self.same_top1 / len(k),
            "tokens": len(k),
        }


class BaseLogprobs:
    """Saved base-model log-probs: tokens, n_ctx and fp16 log-probs [n_scored, n_vocab]."""

    def __init__(self, tokens: list[int], n_ctx: int, rows: list[np.ndarray]):
        self.tokens, self.n_ctx, self.rows = tokens, n_ctx, rows

    def save(self, path: Path, inputs: Iterable = ()) -> None:
        """Write atomically; `inputs` (the model, the text) are never replaced."""
        with atomic_output(path, inputs) as tmp, open(tmp, "wb") as f:
            # a file object: given a name, np.savez would append ".npz" to it
            np.savez(
                f,
                tokens=np.array(self.tokens, dtype=np.int32),
                n_ctx=self.n_ctx,
                logprobs=np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float16),
            )

    @classmethod
    def load(cls, path: Path) -> BaseLogprobs:
        try:
            with np.load(path) as z:
                return cls(z["tokens"].tolist(), int(z["n_ctx"]), [z["logprobs"]])
        except (OSError, KeyError, ValueError) as e:
            raise LlmkitError(f"cannot read KL-divergence base {path}: {e}") from None


def perplexity(
    model,
    new_cache: Callable,
    tokens: list[int],
    n_ctx: int,
    bos_id: int | None,
    max_chunks: int = -1,
    base: BaseLogprobs | None = None,
    save_rows: list | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """Score `tokens` in chunks of n_ctx. `base`: compare with saved log-probs; `save_rows`: collect
    this run's fp16 log-probs (to save as a base)."""
    if n_ctx < 8:
        raise LlmkitError(f"-c must be at least 8 for perplexity, got {n_ctx}")
    n_chunks = len(tokens) // n_ctx
    if max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise LlmkitError(
            f"the text has {len(tokens)} tokens: need at least {n_ctx} (one chunk of -c)"
        )
    first = n_ctx // 2
    res = PerplexityResult(n_ctx, n_chunks)
    base_rows = np.concatenate(base.rows) if base is not None else None
    row0 = 0
    with torch.inference_mode():
        for i in range(n_chunks):
            chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
            if bos_id is not None:
                chunk[0] = bos_id
            cache = new_cache(n_ctx)
            t = torch.tensor(chunk)
            # rows first .. n_ctx-2 predict tokens first+1 .. n_ctx-1
            logits = model.forward(
                t, cache, logits=slice(first, n_ctx - 1)
            ).logits  # [n_ctx-1-first, V]
            logp = torch.log_softmax(logits.double(), -1)
            target = torch.tensor(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx])
            nll = -logp.gather(1, target[:, None])[:, 0]
            res.nll += float(nll.sum())
            res.nll2 += float((nll * nll).sum())
            res.n_tokens += nll.numel()
            res.chunk_ppl.append(res.ppl)
            if save_rows is not None:
                save_rows.append(logp.to(torch.float16).numpy())
            if base_rows is not None:
                b = torch.from_numpy(base_rows[row0 : row0 + nll.numel()]).double()
                res.kld += (b.exp() * (b - logp)).sum(-1).clamp_min(0).tolist()
                res.same_top1 += int((b.argmax(-1) == logp.argmax(-1)).sum())
                row0 += nll.numel()
            if progress:
                progress(i + 1, res.ppl)
    return res
