"""Speculative decoding: the settings (validated once), the acceptance rule, one verification
batch, and the statistics. The round itself is part of the one decode loop (core/decode/loop.py).

Each round the drafter proposes up to k tokens after the last sampled token; the target verifies
[last, d0, ..., d_{k-1}] in ONE forward pass; tokens are accepted by the rule below; the cache is
rolled back to the accepted length and the kept rows go to the drafter with their hidden states.
Draft tree (greedy, branches > 1): beside the drafted chain, the B - 1 next most likely tokens of
the first draft step are verified as siblings of d0 in the same batch (each sees only its
ancestors: `KVCache.tree_batch`); the first position is accepted when any of them is the target's
argmax, and the accepted path is compacted into consecutive cache slots.

Acceptance rule:
  * greedy (temp <= 0): accept d_j while it equals the target's argmax at row j; the first
    mismatching row (or row k when all match) contributes the target's argmax as a bonus token.
    Output is token-for-token the target's greedy output.
  * sampling: d_j was drawn from the draft distribution q_j (same sampler settings); accept it with
    probability min(1, p_j(d_j) / q_j(d_j)) where p_j is the target's sampling distribution at row j;
    on rejection draw from normalize(max(p_j - q_j, 0)) and stop; if all k are accepted, draw a bonus
    token from p_k. The output distribution is exactly the target's (Leviathan et al. 2023).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from llmkit.core.decode.draft import Draft
from llmkit.core.decode.sampling import Sampler, all_finite, host
from llmkit.errors import LlmkitError


@dataclass
class SpecConfig:
    """How to draft: `draft` tokens per round at most (--draft), stop below a draft probability
    of `p_min` (--draft-p-min), verify `branches` candidates at the first position (a draft
    tree, --draft-branches)."""

    draft: int = 3
    p_min: float = 0.0
    branches: int = 1

    def check_values(self) -> None:
        """Ranges that hold for every drafter (what a CLI checks before loading anything)."""
        if not 0.0 <= self.p_min <= 1.0:
            raise LlmkitError(f"--draft-p-min must be in [0, 1], got {self.p_min}")
        if self.branches < 1:
            raise LlmkitError(f"--draft-branches must be >= 1, got {self.branches}")

    def check(self, max_draft: int, why: str, attn_kernel: str) -> None:
        """Everything the loaded drafter and cache decide (`why`: what limits the draft)."""
        self.check_values()
        if not 1 <= self.draft <= max_draft:
            raise LlmkitError(
                f"--draft must be between 1 and {max_draft} ({why}), got {self.draft}"
            )
        from llmkit.kernels import ops  # a drafter is loaded: so is torch

        if self.branches > 1 and not ops.supports_tree_masks(attn_kernel):
            raise LlmkitError(
                f"--draft-branches > 1 needs the torch attention path, not {attn_kernel}"
            )

    def check_sampling(self, greedy: bool) -> None:
        """What the sampler of a generation decides: draft trees are greedy."""
        if self.branches > 1 and not greedy:
            raise LlmkitError("--draft-branches > 1 needs --mtp and greedy decoding (--temp 0)")

    @property
    def verify_rows(self) -> int:
        """Rows of the largest verification batch (a cache's ring margin must hold them)."""
        return self.draft + self.branches


@dataclass
class SpecStats:
    draft_max: int
    drafts: int = 0  # verification rounds that carried at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    branches: int = 1  # candidates verified at the first draft position (draft tree when > 1)
    accepted_alternatives: int = 0  # rounds whose first position was accepted on an alternative
    draft_seconds: float = 0.0  # drafter forward passes
    verify_seconds: float = 0.0  # target verification passes + mirroring the kept rows
    kind: str = "mtp"  # the drafter: "mtp" (NextN heads) or "early-exit" (the first L layers)

    def __post_init__(self):
        self.accepted_per_position = self.accepted_per_position or [0] * self.draft_max

    def record(self, draft: Draft, accepted: list[int]) -> None:
        if not draft.tokens:
            return
        self.drafts += 1
        self.draft_tokens += len(draft.tokens)
        self.accepted_tokens += len(accepted)
        self.accepted_alternatives += int(bool(accepted) and accepted[0] != draft.tokens[0])
        for i in range(len(accepted)):
            self.accepted_per_position[i] += 1

    def to_dict(self, generated_tokens: int) -> dict:
        n = max(0, generated_tokens - 1)  # tokens produced by verification rounds
        total = self.draft_seconds + self.verify_seconds
        return {
            "type": self.kind,
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


def finite(logits) -> np.ndarray:
    """The logits as a host fp32 vector (sampling.host), or a one-line error when the model
    produced NaN / inf (corrupt weights, a tensor type that does not match its bytes): never
    sample from garbage."""
    z = host(logits)
    if not all_finite(z):
        raise LlmkitError("the model produced non-finite logits (NaN or inf): corrupt weights?")
    return z


def accept(s: Sampler, logits, drafts: list[int], qs: list, history: list[int]) -> tuple[int, int]:
    """Apply the acceptance rule to verify logits [k+1, V]: (number accepted, next token). Each
    row is checked for NaN / inf when the rule reads it (rows after a rejection never are)."""

    def row(j: int) -> np.ndarray:
        return finite(logits[j])

    for j, d in enumerate(drafts):
        hist = history + drafts[:j]
        if s.greedy:
            t = s.sample(row(j), hist)
            if t != d:
                return j, t
            continue
        p, q = s.dist(row(j), hist), qs[j]
        if s.uniform() < min(1.0, float(p[d] / q[d])):
            continue
        resid = np.maximum(p - q, 0)
        return j, s.draw(resid / resid.sum() if resid.sum() > 0 else p)
    return len(drafts), s.sample(row(len(drafts)), history + drafts)


def verify(model, cache, s, last: int, draft: Draft, history: list[int], hidden: bool):
    """One verification batch: the target over [last, drafts..., alternatives...] (a draft tree
    when there are alternatives). Returns (accepted tokens, next token, kept tokens [n], their
    hidden states [n, H]), the cache then holding exactly the kept rows. Without drafts and
    without a need for the `hidden` states this is one plain decode step (the logits row only,
    which a CUDA graph can replay); `s` is then any `sample(logits, history)`, else a Sampler."""
    drafts, alts = draft.tokens, draft.alts
    if not drafts and not hidden:
        out = model.forward([last], cache, logits="last")
        return [], s(finite(out.logits[0]), history), [last], out.hidden
    import torch  # drafting: the drafters' models are torch models

    p0 = cache.n_past
    batch = torch.tensor([last, *drafts, *alts])
    parents = [-1, *range(len(drafts)), *[0] * len(alts)]
    with cache.tree_batch(parents) if alts else contextlib.nullcontext():
        h = model.forward(batch, cache, logits=None).hidden  # [1 + k + b, H]
    # the LM head for every row in one call: a small-M matmul reads the head's weights once,
    # which costs less than reading them again for each row the acceptance rule reaches
    logits = model.lm_logits(h)  # rows are checked for NaN / inf as they are read
    t = s.sample(finite(logits[0]), history) if alts else None
    if t is not None and t in alts:  # an alternative is the target's token: it and its bonus
        r = 1 + len(drafts) + alts.index(t)
        path, acc, nxt = [0, r], [t], s.sample(finite(logits[r]), [*history, t])
    else:  # the chain, by the rule above
        n_acc, nxt = accept(s, logits, drafts, draft.qs, history)
        path, acc = list(range(n_acc + 1)), drafts[:n_acc]
    if alts:
        cache.commit_path(p0, path)
        return acc, nxt, batch[path], h[path]
    cache.truncate(p0 + len(path))  # keep last + accepted drafts; rejected rows vanish
    return acc, nxt, batch[: len(path)], h[: len(path)]  # the chain's rows: views
