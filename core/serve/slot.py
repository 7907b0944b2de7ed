"""One server slot: the request it runs, its KV sequence, its own MTP context, its counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.core.cache.paged import SeqKV
from llmkit.core.decode.drafter import DraftState
from llmkit.core.decode.sampling import Sampler, log_softmax, top_k
from llmkit.core.decode.speculative import finite
from llmkit.core.serve.request import Request
from llmkit.core.serve.text import TextOut


@dataclass
class SpecCounts:
    drafts: int = 0  # rounds that carried at least one draft token
    draft_tokens: int = 0
    accepted: int = 0
    per_pos: list[int] = field(default_factory=list)

    def add(self, n_draft: int, n_accepted: int) -> None:
        if not n_draft:
            return
        self.drafts += 1
        self.draft_tokens += n_draft
        self.accepted += n_accepted
        while len(self.per_pos) < n_accepted:
            self.per_pos.append(0)
        for i in range(n_accepted):
            self.per_pos[i] += 1

    def to_dict(self) -> dict:
        return {
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted,
            "accepted_per_position": list(self.per_pos),
            "acceptance_rate": self.accepted / self.draft_tokens if self.draft_tokens else 0.0,
        }


@dataclass
class Slot:
    id: int
    mtp: bool  # the server drafts with MTP (its memory is reserved at start-up for every slot)
    req: Request | None = None
    seq: SeqKV | None = None
    state: str = "idle"  # idle | prefill | decode
    use_mtp: bool = False
    n_eval: int = 0  # prompt tokens whose K/V the sequence holds
    last: int = -1  # the last sampled token: emitted, not yet in the cache
    history: list[int] = field(default_factory=list)  # prompt + generated (repeat penalty)
    draft: DraftState | None = None  # the current MTP request's draft context
    sampler: Sampler | None = None  # the request's sampler (tokens, and draft distributions)
    text: TextOut | None = None
    n_gen: int = 0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    req_spec: SpecCounts = field(default_factory=SpecCounts)  # the current request
    total_spec: SpecCounts = field(default_factory=SpecCounts)  # every request on this slot
    n_requests: int = 0
    logprobs: list = field(default_factory=list)  # entries not sent yet (GenParams.logprobs)
    constraint: object | None = None  # the request's grammar state (core/decode/grammar.py)

    def pick(self, logits: torch.Tensor) -> int:
        """Sample the next token from logits [n_vocab]; with GenParams.logprobs, record its
        log-probability and the top alternatives (log-softmax of the adjusted fp32 logits)."""
        z = self.sampler.adjust(finite(logits), self.history)
        if self.constraint is not None:  # the grammar's mask, then the sampled token advances it
            z = self.constraint.apply(z)
        tok = self.sampler.choose(z)
        if self.constraint is not None:
            self.constraint.consume(tok)
        k = self.req.params.logprobs
        if k is not None:
            lp = log_softmax(z)
            vals, ids = top_k(lp, k) if k else ((), ())
            alts = list(zip(ids.tolist(), vals.tolist())) if k else []
            self.logprobs.append({"id": tok, "logprob": float(lp[tok]), "top": alts})
        return tok

    def take_logprobs(self) -> list | None:
        """The recorded entries not sent yet (None when the request asked for none)."""
        if self.req.params.logprobs is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    def describe(self) -> dict:
        d = {
            "id": self.id,
            "state": self.state,
            "n_requests": self.n_requests,
            "speculative": self.total_spec.to_dict() if self.mtp else None,
        }
        if self.req is not None and self.seq is not None:
            d["request"] = {
                "id": self.req.id,
                "n_prompt": len(self.req.prompt),
                "n_prompt_cached": self.seq.n_shared,
                "n_past": self.seq.n_past,
                "n_generated": self.n_gen,
                "mtp": self.use_mtp,
                "blocks": {g: sum(b >= 0 for b in t) for g, t in self.seq.tables.items()},
                "speculative": self.req_spec.to_dict() if self.use_mtp else None,
            }
        return d
