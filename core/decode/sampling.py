"""Token samplers in llama.cpp's default chain order, built once as a closure.

Order (llama.cpp `common_sampler` defaults): logit bias -> penalties (repetition, then OpenAI's
presence/frequency) -> top-k -> top-p -> min-p -> temperature -> draw. `temp <= 0` is greedy
(argmax of the logits after bias and penalties). Reported log-probabilities (`Sampler.adjust` then
log-softmax) are those of the fp32 logits after bias and penalties, before temperature and the
top-k/top-p/min-p filters.
The draw uses a seeded numpy PCG64 generator: the same seed gives the same tokens, on every
path. Torch-free: logits arrive as numpy arrays or torch tensors of any device (read to the host
once, fp32: `host`), and every distribution it returns is a numpy array.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmkit.errors import LlmkitError
from llmkit.kernels import native_abi

SEED_MAX = 2**64 - 1  # seeds are 64-bit (as llama.cpp's)
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


def host(logits) -> np.ndarray:
    """Logits as a contiguous fp32 numpy vector on the host: a numpy array as it is (converted
    only if it is not fp32), a torch tensor viewed (CPU fp32) or copied (another device/type)."""
    if not isinstance(logits, np.ndarray):
        logits = logits.detach().float().cpu().numpy()
    return np.ascontiguousarray(logits.reshape(-1), dtype=np.float32)


def argmax(z: np.ndarray) -> int:
    """The first index of the maximum (of the first NaN, if any): the native row op."""
    lib = native_abi.LIB
    if lib is None:
        return int(np.argmax(z))
    return int(lib.llk_argmax(z.ctypes.data, z.size))


def argmax_prob(z: np.ndarray) -> tuple[int, float]:
    """(argmax, its softmax probability) in one pass over the row (the native row op)."""
    lib = native_abi.LIB
    if lib is None:
        i = int(np.argmax(z))
        return i, float(1.0 / np.exp(z.astype(np.float64) - z[i]).sum())
    prob = ctypes.c_float()
    i = int(lib.llk_argmax_prob(z.ctypes.data, z.size, ctypes.byref(prob)))
    return i, prob.value


def all_finite(z: np.ndarray) -> bool:
    lib = native_abi.LIB
    if lib is None:
        return bool(np.isfinite(z).all())
    return bool(lib.llk_all_finite(z.ctypes.data, z.size))


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log-probabilities of fp32 logits (what reported logprobs are): fp32 exponentials, their
    sum in fp64 (0.34 ms on 262k values; all-fp64 took 3.7)."""
    m = z.max()
    return z - (m + np.float32(np.log(np.exp(z - m).sum(dtype=np.float64))))


def top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, ids) of the k largest entries, sorted descending, ties by the lower id (among
    ties at the k-th value, any k when there are more than 8 k of them). Cost ~0.3 ms on a
    262k vocabulary: the k-th largest of every 16th value bounds the k-th largest from below,
    so one compare pass leaves ~16 k candidates (a full argpartition takes ~3.5 ms)."""
    k = min(k, z.size)
    if z.size >= 64 * k:
        sub = z[::16]
        thr = np.partition(sub, sub.size - k)[sub.size - k]
        ids = np.flatnonzero(z >= thr)
    else:
        ids = np.arange(z.size)
    if ids.size > 8 * k:  # many ties at the threshold (e.g. a grammar's -inf): partition them
        ids = ids[np.argpartition(-z[ids], k - 1)[:k]]
    ids = ids[np.lexsort((ids, -z[ids]))[:k]]
    return z[ids], ids


def apply_repeat_penalty(logits, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's rule: positive logits are divided by the penalty, negative ones multiplied."""
    logits = host(logits)
    if penalty == 1.0 or not recent:
        return logits
    ids = np.array(sorted(set(recent)), dtype=np.int64)
    vals = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(vals > 0, vals / np.float32(penalty), vals * np.float32(penalty))
    return logits


def filtered_probs(logits, p: SamplerParams) -> tuple[np.ndarray, np.ndarray]:
    """(candidate ids, their probabilities) after top-k, top-p, min-p and temperature."""
    z = host(logits)
    vals, ids = top_k(z, z.size if p.top_k <= 0 else p.top_k)  # sorted descending
    if p.top_p < 1.0:
        cum = np.cumsum(softmax(vals))
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int((cum < p.top_p).sum()) + 1
        vals, ids = vals[:keep], ids[:keep]
    if p.min_p > 0.0 and vals.size > 1:
        probs = softmax(vals)
        keep = probs >= p.min_p * probs[0]
        vals, ids = vals[keep], ids[keep]
    return ids, softmax(vals / np.float32(p.temp))


class Sampler:
    """The run's sampler, one seeded generator: `sample` draws the tokens a generation emits
    (llama.cpp's chain, above), and `dist` / `pick_draft` / `uniform` give what speculative
    acceptance needs (core/decode/speculative.py): the target's and the draft's distributions."""

    def __init__(self, p: SamplerParams, n_prompt: int = 0):
        p.validate()
        self.p, self.greedy = p, p.temp <= 0
        self.n_prompt = n_prompt  # history[:n_prompt] is the prompt: no presence/frequency penalty
        seed = p.seed if p.seed >= 0 else np.random.SeedSequence().entropy
        self.gen = np.random.Generator(np.random.PCG64(seed))
        bias = p.logit_bias or {}
        self._bias_ids = np.array(list(bias), dtype=np.int64)
        self._bias = np.array(list(bias.values()), dtype=np.float32)
        self._argmax_only = (
            self.greedy
            and not bias
            and p.repeat_penalty == 1.0
            and not (p.frequency_penalty or p.presence_penalty)
        )

    def adjust(self, logits, history: Sequence[int] = ()) -> np.ndarray:
        """fp32 logits after the logit bias and the penalties: what is sampled from (after the
        filters and temperature) and what reported log-probabilities are the log-softmax of."""
        z = host(logits)
        if self._bias_ids.size:
            if int(self._bias_ids.max()) >= z.size:
                raise LlmkitError(f"logit_bias: token ids must be below {z.size}")
            z = z.copy()
            z[self._bias_ids] += self._bias
        n = self.p.repeat_last_n
        recent = history[-n:] if n > 0 else history
        z = apply_repeat_penalty(z, recent, self.p.repeat_penalty)
        fp, pp = self.p.frequency_penalty, self.p.presence_penalty
        generated = history[self.n_prompt :] if fp or pp else ()
        if len(generated):
            ids, counts = np.unique(np.asarray(list(generated), dtype=np.int64), return_counts=True)
            z = z.copy()
            z[ids] -= np.float32(fp) * counts.astype(np.float32) + np.float32(pp)
        return z

    def choose(self, logits) -> int:
        """The token for already adjusted logits (greedy when temp <= 0)."""
        if self.greedy:
            return argmax(host(logits))
        ids, probs = filtered_probs(logits, self.p)
        return int(ids[self.draw(probs)])

    def sample(self, logits, history: Sequence[int] = ()) -> int:
        """The next token for logits [n_vocab] after `history` (greedy when temp <= 0)."""
        if self._argmax_only:  # nothing to adjust: the argmax of the (fp32) logits
            return argmax(host(logits))
        return self.choose(self.adjust(logits, history))

    __call__ = sample

    def dist(self, logits, history: Sequence[int]) -> np.ndarray:
        """The sampling distribution as a dense fp32 [n_vocab] vector."""
        ids, probs = filtered_probs(self.adjust(logits, history), self.p)
        out = np.zeros(host(logits).size, dtype=np.float32)
        out[ids] = probs
        return out

    def draw(self, probs: np.ndarray) -> int:
        """An index drawn with probability proportional to `probs` (>= 0, not all zero)."""
        cum = np.cumsum(probs, dtype=np.float64)
        i = int(np.searchsorted(cum, self.gen.random() * cum[-1], side="right"))
        return min(i, int(np.flatnonzero(probs)[-1]))  # u * total == total: the last candidate

    def uniform(self) -> float:
        return float(self.gen.random())

    def pick_draft(self, logits) -> tuple[int, np.ndarray | None, float]:
        """(token, q, q[token]) for a draft step: greedy drafts carry no distribution."""
        if self.greedy:
            tok, prob = argmax_prob(host(logits))
            return tok, None, prob
        q = self.dist(logits, ())
        tok = self.draw(q)
        return tok, q, float(q[tok])


def make_sampler(p: SamplerParams) -> Sampler:
    """sample(logits [n_vocab], history) -> token id."""
    return Sampler(p)
