"""The one decode loop: evaluate the prompt, then rounds of (draft, verify, accept, emit) until
end-of-generation, the token limit or a full context. Plain decoding is the round with nothing
drafted: one forward of the last token and one sampled token.

    for tok in generate(lm.model, cache, prompt_ids, Sampler(params), n_predict=64):
        ...
    spec = Speculation(MTPDrafter(lm.model.mtp, n_ctx, margin), SpecConfig(draft=3), stats)
    for tok in generate(lm.model, cache, prompt_ids, sampler, spec=spec): ...

The prompt is evaluated in chunks of `n_ubatch` tokens (the KV ring margin must hold a chunk).
Timings are collected in a `GenStats` (and the speculative counts in the Speculation's stats).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from llmkit.core.decode.draft import Draft, Drafter
from llmkit.core.decode.sampling import Sampler
from llmkit.core.decode.speculative import SpecConfig, SpecStats, finite, verify
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

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        n = self.decode_tokens
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class Speculation:
    """A drafter with its settings (validated by whoever built it) and statistics."""

    drafter: Drafter
    config: SpecConfig
    stats: SpecStats


def no_grad():
    """torch's inference mode while a torch model runs (torch is then loaded); nothing to do
    for the torch-free runtime (core/lean/), which never imports it."""
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


def prefill(model, cache, ids: Sequence[int], n_ubatch: int = 512, drafter: Drafter | None = None):
    """Evaluate `ids` after what the cache holds (and show the rows to the drafter); return the
    last position's logits as a host fp32 vector [n_vocab]."""
    if not ids:
        raise LlmkitError("empty prompt: nothing to evaluate")
    n_ubatch = max(1, min(n_ubatch, cache.margin))
    t = list(ids)
    logits = None
    for s in range(0, len(t), n_ubatch):
        chunk, p0 = t[s : s + n_ubatch], cache.n_past
        if drafter is None:
            logits = model.forward(chunk, cache, logits="last").logits
        else:  # every row's hidden state: the drafter mirrors them (drafters are torch models)
            import torch

            h = model.forward(chunk, cache, logits=None).hidden
            drafter.observe(p0, torch.tensor(chunk, dtype=torch.long), h)
            logits = model.lm_logits(h[-1:])
    return finite(logits[0])


def generate(
    model,
    cache,
    prompt: Sequence[int],
    sampler: Sampler | Callable,
    n_predict: int = -1,
    is_eog: Callable[[int], bool] = lambda t: False,
    ignore_eos: bool = False,
    stats: GenStats | None = None,
    n_ubatch: int = 512,
    spec: Speculation | None = None,
) -> Iterator[int]:
    """Yield tokens until EOG (unless ignore_eos), n_predict tokens, or a full context. Plain
    decoding takes any `sample(logits, history) -> token`; speculation needs a `Sampler` (its
    draft and target distributions)."""
    stats = stats if stats is not None else GenStats()
    if cache.n_past + len(prompt) > cache.n_ctx:
        raise LlmkitError(
            f"prompt is too long: {cache.n_past + len(prompt)} tokens do not fit the context "
            f"size {cache.n_ctx} (raise -c)"
        )
    drafter = spec.drafter if spec is not None else None
    history = list(prompt)
    with no_grad():
        t0 = time.perf_counter()
        logits = prefill(model, cache, prompt, n_ubatch, drafter)
        stats.prompt_tokens += len(prompt)
        stats.prompt_seconds += time.perf_counter() - t0
        pending = [sampler(logits, history)]  # sampled, not yet in the cache
        n_gen = 0  # this call's tokens (stats may accumulate over several calls, e.g. chat turns)
        while True:
            for tok in pending:  # emit in order; stop at EOG / the limit
                if 0 <= n_predict <= n_gen:
                    stats.stop_reason = "limit"
                    return
                if is_eog(tok) and not ignore_eos:
                    stats.stop_reason = "eog"
                    return
                history.append(tok)
                stats.tokens.append(tok)
                stats.generated_tokens += 1
                n_gen += 1
                yield tok
            if 0 <= n_predict <= n_gen:
                stats.stop_reason = "limit"
                return
            last, p0 = pending[-1], cache.n_past
            room = cache.n_ctx - p0 - 1  # a verify batch occupies positions p0 .. p0 + k
            if room < 0:
                stats.stop_reason = "context full"
                return
            t0 = time.perf_counter()
            draft = Draft()
            if spec is not None:
                k = min(spec.config.draft, room, n_predict - n_gen - 1 if n_predict >= 0 else room)
                b = min(spec.config.branches, room - k + 1)  # the alternatives take room too
                if k > 0:
                    draft = drafter.draft(last, k, sampler.pick_draft, spec.config.p_min, b)
            t1 = time.perf_counter()
            acc, nxt, kept, kept_h = verify(
                model, cache, sampler, last, draft, history, drafter is not None
            )
            if drafter is not None:
                drafter.observe(p0, kept, kept_h)
            t2 = time.perf_counter()
            stats.decode_steps += 1
            stats.decode_tokens += len(acc) + 1
            stats.decode_seconds += t2 - t0
            if spec is not None:
                spec.stats.draft_seconds += t1 - t0
                spec.stats.verify_seconds += t2 - t1
                spec.stats.record(draft, acc)
            pending = [*acc, nxt]
