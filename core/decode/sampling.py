"""Token samplers in llama.cpp's default chain order, built once as a closure.

Order (llama.cpp `common_sampler` defaults): repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw. `temp <= 0` is greedy (argmax of the raw logits, penalties applied).
The draw uses a seeded `torch.Generator`: the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError

SEED_MAX = 2**64 - 1  # torch.Generator seeds are 64-bit
CLI_NAMES = {
    "temp": "--temp",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty",
    "repeat_last_n": "--repeat-last-n",
    "seed": "--seed",
}


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1  # -1: random

    def validate(self, names: dict[str, str] | None = None) -> None:
        """LlmkitError naming the bad parameter; `names` maps field -> the name the user typed
        (the default is the `llm run` flag: --temp, --top-p, ...)."""
        flag = {**CLI_NAMES, **(names or {})}

        def number(key: str, integer: bool = False):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
                kind = "an integer" if integer else "a number"
                raise LlmkitError(f"{flag[key]} must be {kind}, got {v!r}")
            if not integer and not math.isfinite(v):
                raise LlmkitError(f"{flag[key]} must be a finite number, got {v}")
            return v

        if number("temp") < 0:
            raise LlmkitError(f"{flag['temp']} must be >= 0 (0: greedy), got {self.temp}")
        if number("top_k", integer=True) < 0:
            raise LlmkitError(f"{flag['top_k']} must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 <= number("top_p") <= 1.0:
            raise LlmkitError(f"{flag['top_p']} must be in [0, 1], got {self.top_p}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise LlmkitError(f"{flag['min_p']} must be in [0, 1], got {self.min_p}")
        if number("repeat_penalty") <= 0:
            raise LlmkitError(f"{flag['repeat_penalty']} must be > 0, got {self.repeat_penalty}")
        if number("repeat_last_n", integer=True) < -1:
            raise LlmkitError(f"{flag['repeat_last_n']} must be >= -1, got {self.repeat_last_n}")
        if not -1 <= number("seed", integer=True) <= SEED_MAX:
            raise LlmkitError(
                f"{flag['seed']} must be -1 (random) or between 0 and {SEED_MAX} (64 bits), "
                f"got {self.seed}"
            )


def apply_repeat_penalty(
    logits: torch.Tensor, recent: Sequence[int], penalty: float
) -> torch.Tensor:
    """llama.cpp's rule: positive logits are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long)
    vals = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filtered_probs(logits: torch.Tensor, p: SamplerParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate ids, their probabilities) after top-k, top-p, min-p and temperature."""
    logits = logits.float()
    k = logits.numel() if p.top_k <= 0 else min(p.top_k, logits.numel())
    vals, ids = torch.topk(logits, k)  # sorted descending
    if p.top_p < 1.0:
        probs = torch.softmax(vals, -1)
        cum = torch.cumsum(probs, -1)
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int((cum < p.top_p).sum()) + 1
        vals, ids = vals[:keep], ids[:keep]
    if p.min_p > 0.0 and vals.numel() > 1:
        probs = torch.softmax(vals, -1)
        keep = probs >= p.min_p * probs[0]
        vals, ids = vals[keep], ids[keep]
    return ids, torch.softmax(vals / p.temp, -1)


class Sampler:
    """The run's sampler, one seeded generator: `sample` draws the tokens a generation emits
    (llama.cpp's chain, above), and `dist` / `pick_draft` / `uniform` give what speculative
    acceptance needs (core/decode/speculative.py): the target's and the draft's distributions."""

    def __init__(self, p: SamplerParams):
        p.validate()
        self.p, self.greedy = p, p.temp <= 0
        self.gen = torch.Generator()
        self.gen.manual_seed(p.seed if p.seed >= 0 else torch.seed())

    def _penalized(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        n = self.p.repeat_last_n
        recent = history[-n:] if n > 0 else history
        return apply_repeat_penalty(logits, recent, self.p.repeat_penalty)

    def sample(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """The next token for logits [n_vocab] after `history` (greedy when temp <= 0)."""
        logits = self._penalized(logits, history)
        if self.greedy:
            return int(torch.argmax(logits))
        ids, probs = filtered_probs(logits, self.p)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])

    __call__ = sample

    def dist(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The sampling distribution as a dense [n_vocab] vector."""
        ids, probs = filtered_probs(self._penalized(logits, history), self.p)
        return torch.zeros(logits.numel(), dtype=torch.float32).index_put_((ids,), probs.float())

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def pick_draft(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        """(token, q, q[token]) for a draft step: greedy drafts carry no distribution."""
        if self.greedy:
            tok = int(torch.argmax(logits))
            return tok, None, float(torch.softmax(logits.float(), -1)[tok])
        q = self.dist(logits, ())
        tok = self.draw(q)
        return tok, q, float(q[tok])


def make_sampler(p: SamplerParams) -> Sampler:
    """sample(logits [n_vocab], history) -> token id."""
    return Sampler(p)
