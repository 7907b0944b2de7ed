"""Token samplers in llama.cpp's default chain order, built once as a closure.

Order (llama.cpp `common_sampler` defaults): logit bias -> penalties (repetition, then OpenAI's
presence/frequency) -> top-k -> top-p -> min-p -> temperature -> draw. `temp <= 0` is greedy
(argmax of the logits after bias and penalties). Reported log-probabilities (`Sampler.adjust` then
log-softmax) are those of the fp32 logits after bias and penalties, before temperature and the
top-k/top-p/min-p filters.
The draw uses a seeded `torch.Generator`: the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import ops

SEED_MAX = 2**64 - 1  # torch.Generator seeds are 64-bit
CLI_NAMES = {
    "temp": "--temp",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty",
    "repeat_last_n": "--repeat-last-n",
    "seed": "--seed",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "logit_bias": "--logit-bias",
}
LOGIT_BIAS_MAX = 100.0  # OpenAI's range for a logit bias: [-100, 100]


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1  # -1: random
    # OpenAI semantics, over the generated tokens (Sampler.n_prompt leading history tokens are the
    # prompt): logit -= frequency_penalty * count + presence_penalty * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

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
        for key in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(key) <= 2.0:
                raise LlmkitError(f"{flag[key]} must be in [-2, 2], got {getattr(self, key)}")
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise LlmkitError(f"{flag['logit_bias']} must map token ids to biases, got {bias!r}")
        for tok, b in bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise LlmkitError(
                    f"{flag['logit_bias']}: token ids must be integers >= 0, got {tok!r}"
                )
            ok = isinstance(b, (int, float)) and not isinstance(b, bool)
            ok = ok and (abs(b) <= LOGIT_BIAS_MAX or b == -math.inf)  # -inf: never sampled
            if not ok:
                raise LlmkitError(
                    f"{flag['logit_bias']}: the bias of token {tok} must be a number in "
                    f"[-100, 100] or -inf, got {b!r}"
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

    def __init__(self, p: SamplerParams, n_prompt: int = 0):
        p.validate()
        self.p, self.greedy = p, p.temp <= 0
        self.n_prompt = n_prompt  # history[:n_prompt] is the prompt: no presence/frequency penalty
        self.gen = torch.Generator()
        self.gen.manual_seed(p.seed if p.seed >= 0 else torch.seed())
        bias = p.logit_bias or {}
        self._bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self._bias = torch.tensor(list(bias.values()), dtype=torch.float32)
        self._argmax_only = (
            self.greedy
            and not bias
            and p.repeat_penalty == 1.0
            and not (p.frequency_penalty or p.presence_penalty)
        )

    def adjust(self, logits: torch.Tensor, history: Sequence[int] = ()) -> torch.Tensor:
        """fp32 logits after the logit bias and the penalties: what is sampled from (after the
        filters and temperature) and what reported log-probabilities are the log-softmax of."""
        logits = logits.float()
        if self._bias_ids.numel():
            if int(self._bias_ids.max()) >= logits.numel():
                raise LlmkitError(f"logit_bias: token ids must be below {logits.numel()}")
            logits = logits.clone()
            logits[self._bias_ids] += self._bias
        n = self.p.repeat_last_n
        recent = history[-n:] if n > 0 else history
        logits = apply_repeat_penalty(logits, recent, self.p.repeat_penalty)
        fp, pp = self.p.frequency_penalty, self.p.presence_penalty
        generated = history[self.n_prompt :] if fp or pp else ()
        if generated:
            ids, counts = torch.unique(torch.tensor(list(generated)), return_counts=True)
            logits = logits.clone()
            logits[ids] -= fp * counts.float() + pp
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """The token for already adjusted logits (greedy when temp <= 0)."""
        if self.greedy:
            return ops.argmax(logits)
        ids, probs = filtered_probs(logits, self.p)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])

    def sample(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """The next token for logits [n_vocab] after `history` (greedy when temp <= 0)."""
        if self._argmax_only:  # nothing to adjust: the argmax of the (fp32) logits
            return ops.argmax(logits)
        return self.choose(self.adjust(logits, history))

    __call__ = sample

    def dist(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The sampling distribution as a dense [n_vocab] vector."""
        ids, probs = filtered_probs(self.adjust(logits, history), self.p)
        return torch.zeros(logits.numel(), dtype=torch.float32).index_put_((ids,), probs.float())

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def pick_draft(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        """(token, q, q[token]) for a draft step: greedy drafts carry no distribution."""
        if self.greedy:
            tok, prob = ops.argmax_prob(logits.float())
            return tok, None, prob
        q = self.dist(logits, ())
        tok = self.draw(q)
        return tok, q, float(q[tok])


def make_sampler(p: SamplerParams) -> Sampler:
    """sample(logits [n_vocab], history) -> token id."""
    return Sampler(p)
