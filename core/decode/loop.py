"""Prompt processing and token generation as a generator.

    for tok in generate(lm.model, cache, prompt_ids, sampler, n_predict=64, is_eog=tok.is_eog):
        ...

The prompt is evaluated in chunks of `n_ubatch` tokens (the KV ring margin must hold a whole chunk);
each decode step feeds back one sampled token. Timings are collected in a `GenStats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmkit.core.cache.kv import KVCache
from llmkit.errors import LlmkitError


@dataclass
class GenStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # decode forward passes only (llama.cpp's "eval time")
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""
    decode_steps: int = 0  # decode forward passes (llama.cpp's "runs"; one per speculative round)
    decode_tokens: int = 0  # tokens those passes produced (more than one per speculative round)

    def record(self, tok: int, history: list[int]) -> None:
        """Account for one emitted token (both generators)."""
        history.append(tok)
        self.tokens.append(tok)
        self.generated_tokens += 1

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        n = self.decode_tokens
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def prefill(model, cache: KVCache, ids: Sequence[int], n_ubatch: int = 512) -> torch.Tensor:
    """Evaluate `ids` after what the cache holds; return the last position's logits [n_vocab]."""
    if not ids:
        raise LlmkitError("empty prompt: nothing to evaluate")
    n_ubatch = max(1, min(n_ubatch, cache.margin))
    t = torch.tensor(list(ids), dtype=torch.long)
    logits = None
    for s in range(0, t.numel(), n_ubatch):
        logits = model.forward(t[s : s + n_ubatch], cache, logits="last")
    return logits[0]


def generate(
    model,
    cache: KVCache,
    prompt: Sequence[int],
    sample: Callable[[torch.Tensor, Sequence[int]], int],
    n_predict: int = -1,
    is_eog: Callable[[int], bool] = lambda t: False,
    ignore_eos: bool = False,
    stats: GenStats | None = None,
    n_ubatch: int = 512,
) -> Iterator[int]:
    """Yield sampled tokens until EOG (unless ignore_eos), n_predict tokens, or a full context."""
    stats = stats if stats is not None else GenStats()
    n_ctx = cache.n_ctx
    if cache.n_past + len(prompt) > n_ctx:
        raise LlmkitError(
            f"prompt is too long: {cache.n_past + len(prompt)} tokens do not fit the context "
            f"size {n_ctx} (raise -c)"
        )
    history = list(prompt)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = prefill(model, cache, prompt, n_ubatch)
        stats.prompt_tokens += len(prompt)
        stats.prompt_seconds += time.perf_counter() - t0
        n_gen = 0  # this call's tokens (stats may accumulate over several calls, e.g. chat turns)
        while n_predict < 0 or n_gen < n_predict:
            tok = sample(logits, history)
            if is_eog(tok) and not ignore_eos:
                stats.stop_reason = "eog"
                break
            stats.record(tok, history)
            n_gen += 1
            yield tok
            if n_predict >= 0 and n_gen >= n_predict:
                stats.stop_reason = "limit"
                break
            if cache.n_past >= n_ctx:
                stats.stop_reason = "context full"
                break
            t0 = time.perf_counter()  # eval time: the forward passes only, as llama.cpp counts it
            logits = model.forward(torch.tensor([tok]), cache, logits="last")[0]
            stats.decode_steps += 1
            stats.decode_tokens += 1
            stats.decode_seconds += time.perf_counter() - t0
