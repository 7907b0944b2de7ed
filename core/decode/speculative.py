"""Speculative decoding with the model's own MTP (NextN) blocks as the draft.

Each round: the MTP context drafts up to k tokens after the last sampled token; the target verifies
[last, d0, ..., d_{k-1}] in ONE forward pass (k+1 rows of logits and hidden states); tokens are
accepted by the rule below; both caches are rolled back to the accepted length and the accepted rows
are mirrored into the MTP context with the target's hidden states.

Draft tree (greedy, --draft-branches B > 1): beside the drafted chain, the B - 1 next most likely
tokens of the first draft step are verified as siblings of d0 in the same batch (each sees only its
ancestors: `KVCache.tree_batch`); the first position is accepted when any of them is the target's
argmax, and the accepted path is compacted into consecutive cache slots.

Acceptance rule:
  * greedy (temp <= 0): accept d_j while it equals the target's argmax at row j; the first
    mismatching row (or row k when all match) contributes the target's argmax as a bonus token.
    Output is token-for-token the target's greedy output.
  * sampling: d_j was drawn from the draft distribution q_j (same sampler settings); accept it with
    probability min(1, p_j(d_j) / q_j(d_j)) where p_j is the target's sampling distribution at row j;
    on rejection draw from normalize(max(p_j - q_j, 0)) and stop; if all k are accepted, draw a bonus
    token from p_k. The output distribution is exactly the target's (Leviathan et al. 2023), and
    acceptance is higher than llama.cpp's sample-target-then-compare rule.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmkit.core.cache.kv import KVCache
from llmkit.core.decode.drafter import MTPContext
from llmkit.core.decode.loop import GenStats
from llmkit.core.decode.sampling import SamplerParams, apply_repeat_penalty, filtered_probs
from llmkit.errors import LlmkitError


@dataclass
class SpecStats:
    draft_max: int
    drafts: int = 0  # verification rounds that carried at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    branches: int = 1  # candidates verified at the first draft position (draft tree when > 1)
    accepted_alternatives: int = 0  # rounds whose first position was accepted on an alternative
    draft_seconds: float = 0.0  # MTP forward passes while drafting
    verify_seconds: float = 0.0  # target verification passes + mirroring accepted rows

    def __post_init__(self):
        self.accepted_per_position = self.accepted_per_position or [0] * self.draft_max

    def to_dict(self, gen: GenStats) -> dict:
        n = max(0, gen.generated_tokens - 1)  # tokens produced by verification rounds
        total = self.draft_seconds + self.verify_seconds
        return {
            "type": "mtp",
            "draft_max": self.draft_max,
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.accepted_tokens / self.draft_tokens
            if self.draft_tokens
            else 0.0,
            "accepted_per_position": list(self.accepted_per_position),
            "draft_branches": self.branches,
            "accepted_alternatives": self.accepted_alternatives,
            "acceptance_per_position": [
                a / self.drafts if self.drafts else 0.0 for a in self.accepted_per_position
            ],
            "mean_accepted_length": 1 + self.accepted_tokens / self.drafts if self.drafts else 1.0,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "decode_tok_per_s": n / total if total > 0 else 0.0,
            "decode_tok_per_s_without_drafting": n / self.verify_seconds
            if self.verify_seconds > 0
            else 0.0,
        }


class _Sampler:
    """Target and draft distributions with the run's sampler settings, one seeded generator."""

    def __init__(self, p: SamplerParams):
        p.validate()
        self.p, self.greedy = p, p.temp <= 0
        self.gen = torch.Generator()
        self.gen.manual_seed(p.seed if p.seed >= 0 else torch.seed())

    def _penalized(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        n = self.p.repeat_last_n
        return apply_repeat_penalty(
            logits, history[-n:] if n > 0 else history, self.p.repeat_penalty
        )

    def dist(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        ids, probs = filtered_probs(self._penalized(logits, history), self.p)
        return torch.zeros(logits.numel(), dtype=torch.float32).index_put_((ids,), probs.float())

    def target_token(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        if self.greedy:
            return int(torch.argmax(self._penalized(logits, history)))
        return self.draw(self.dist(logits, history))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def pick_draft(self, logits: torch.Tensor):
        """(token, q, its probability) for the MTP draft."""
        if self.greedy:
            tok = int(torch.argmax(logits))
            return tok, None, float(torch.softmax(logits.float(), -1)[tok])
        q = self.dist(logits, ())
        tok = self.draw(q)
        return tok, q, float(q[tok])


def _head_row(model, h: torch.Tensor, j: int) -> torch.Tensor:
    """Logits [V] of verify row j from its pre-norm hidden (h [k+1, H])."""
    return model.lm_logits(h[j : j + 1])[0]


def _accept(s: _Sampler, logits, drafts: list[int], qs: list, history: list[int]):
    """Apply the acceptance rule to verify logits [k+1, V] (a tensor, or a function giving row j,
    called only for the rows the rule reads): (number accepted, next token)."""
    row = logits.__getitem__ if isinstance(logits, torch.Tensor) else logits
    for j, d in enumerate(drafts):
        hist = history + drafts[:j]
        if s.greedy:
            t = s.target_token(row(j), hist)
            if t != d:
                return j, t
            continue
        p, q = s.dist(row(j), hist), qs[j]
        if s.uniform() < min(1.0, float(p[d] / q[d])):
            continue
        resid = (p - q).clamp_min(0)
        return j, s.draw(resid / resid.sum() if resid.sum() > 0 else p)
    return len(drafts), s.target_token(row(len(drafts)), history + drafts)


def _verify(model, cache: KVCache, s: _Sampler, last: int, drafts, qs, alts, history):
    """One verification batch: the trunk over [last, drafts..., alternatives...] (a draft tree when
    there are alternatives). Returns (accepted tokens, next token, kept tokens [n], their hidden
    states [n, H]), the cache then holding exactly the kept rows."""
    p0 = cache.n_past
    batch = torch.tensor([last, *drafts, *alts])
    parents = [-1, *range(len(drafts)), *[0] * len(alts)]
    with cache.tree_batch(parents) if alts else contextlib.nullcontext():
        _, v_h = model.forward(batch, cache, logits=None, hidden=True)  # v_h [1 + k + b, H]
    # the LM head row by row, only where the acceptance rule reads (rows after a rejection never
    # pay it: the head is up to half a step)
    row = functools.cache(functools.partial(_head_row, model, v_h))
    t = s.target_token(row(0), history) if alts else None
    if t is not None and t in alts:  # an alternative is the target's token: it and its bonus
        r = 1 + len(drafts) + alts.index(t)
        path, acc, nxt = [0, r], [t], s.target_token(row(r), [*history, t])
    else:  # the chain, by the rule above
        n_acc, nxt = _accept(s, row, drafts, qs, history)
        path, acc = list(range(n_acc + 1)), drafts[:n_acc]
    if alts:
        cache.commit_path(p0, path)
    else:
        cache.truncate(p0 + len(path))  # keep last + accepted drafts; rejected rows vanish
    return acc, nxt, batch[path], v_h[path]


def _prefill(
    model, cache: KVCache, mtp: MTPContext, ids: Sequence[int], n_ubatch: int
) -> torch.Tensor:
    """Evaluate the prompt with hidden states and mirror every row the MTP context lacks."""
    n_ubatch = max(1, min(n_ubatch, cache.margin))
    t = torch.tensor(list(ids), dtype=torch.long)
    for s in range(0, t.numel(), n_ubatch):
        chunk = t[s : s + n_ubatch]
        p0 = cache.n_past
        logits, h = model.forward(chunk, cache, logits="last", hidden=True)
        skip = max(0, mtp.n_past - p0)  # rows whose MTP entries survived a chat-turn rollback
        if skip:
            mtp.pending_h = h[skip - 1]
        if skip < chunk.numel():
            mtp.mirror(chunk[skip:], h[skip:])
    return logits[0]


def speculative_generate(
    model,
    cache: KVCache,
    mtp: MTPContext,
    prompt: Sequence[int],
    params: SamplerParams,
    spec: SpecStats,
    n_predict: int = -1,
    is_eog: Callable[[int], bool] = lambda t: False,
    ignore_eos: bool = False,
    stats: GenStats | None = None,
    p_min: float = 0.0,
    n_ubatch: int = 512,
    branches: int = 1,
) -> Iterator[int]:
    """Like `generate`, with MTP drafting; `spec` collects the speculative statistics. branches > 1:
    draft trees (greedy decoding and the torch attention path only)."""
    stats = stats if stats is not None else GenStats()
    if branches > 1 and (params.temp > 0 or cache.attn_kernel != "torch"):
        raise LlmkitError("--draft-branches > 1 needs greedy decoding (--temp 0) on the CPU path")
    spec.branches = branches
    if cache.n_past + len(prompt) > cache.n_ctx:
        raise LlmkitError(
            f"prompt is too long: {cache.n_past + len(prompt)} tokens do not fit the "
            f"context size {cache.n_ctx} (raise -c)"
        )
    s = _Sampler(params)
    history = list(prompt)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = _prefill(model, cache, mtp, prompt, n_ubatch)
        stats.prompt_tokens += len(prompt)
        stats.prompt_seconds += time.perf_counter() - t0
        if n_predict == 0:
            stats.stop_reason = "limit"
            return
        pending = [s.target_token(logits, history)]  # sampled, not yet in any cache
        n_gen = 0
        while True:
            for tok in pending:  # emit in order; stop at EOG / the limit
                if is_eog(tok) and not ignore_eos:
                    stats.stop_reason = "eog"
                    return
                stats.record(tok, history)
                n_gen += 1
                yield tok
                if 0 <= n_predict <= n_gen:
                    stats.stop_reason = "limit"
                    return
            last, p0 = pending[-1], cache.n_past
            room = cache.n_ctx - p0 - 1  # the verify batch occupies positions p0 .. p0 + k
            if room < 0:
                stats.stop_reason = "context full"
                return
            k = min(spec.draft_max, room, n_predict - n_gen - 1 if n_predict >= 0 else room)
            b = min(branches, room - k + 1)  # the alternatives take room too
            t0 = time.perf_counter()
            drafts, qs, alts = mtp.draft(last, k, s.pick_draft, p_min, b) if k > 0 else ([], [], [])
            t1 = time.perf_counter()
            acc, nxt, kept, kept_h = _verify(model, cache, s, last, drafts, qs, alts, history)
            mtp.mirror(kept, kept_h)
            t2 = time.perf_counter()
            spec.draft_seconds += t1 - t0
            spec.verify_seconds += t2 - t1
            stats.decode_steps += 1
            stats.decode_tokens += len(acc) + 1
            stats.decode_seconds += t2 - t0
            if drafts:
                spec.drafts += 1
                spec.draft_tokens += len(drafts)
                spec.accepted_tokens += len(acc)
                spec.accepted_alternatives += int(bool(acc) and acc[0] != drafts[0])
                for i in range(len(acc)):
                    spec.accepted_per_position[i] += 1
            pending = [*acc, nxt]
