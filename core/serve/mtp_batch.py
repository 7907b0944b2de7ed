"""The MTP (NextN) draft state of every slot, drafted and mirrored for all slots together.

Same contract as core/mtp.py's MTPContext (alignment: the row of the token at position p carries
the trunk hidden of p-1; chained heads each re-decode the draft prefix over their own KV; every
draft is trimmed away afterwards and accepted rows are mirrored from the target), but the NextN
layers' KV of all slots lives in paged pools, one per head, and each draft step and each mirror
round is ONE mtp_forward over the rows of every drafting slot (BatchCache: per-sequence positions,
attention per sequence). Hidden states travel per row and per slot; they are never mixed.

Memory is reserved once at start-up: each pool holds n_slots sequences of n_ctx tokens, sized from
the single-sequence shape of the NextN layers (a reserve-only plan that needs no live sequence), so
opening a slot's draft state can never fail or allocate.

Mirroring is lazy: accepted rows wait in the slot's `lag` until the slot drafts again, so a slot
whose policy drafts nothing pays no MTP forward, and resuming costs one batched catch-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmkit.core.cache.batch import BatchCache
from llmkit.core.cache.paged import PagedKV, SeqKV
from llmkit.errors import LlmkitError


@dataclass
class DraftState:
    """One slot's draft context: its sequence in every head's pool, the hidden carried over to
    the next mirrored row, and accepted (tokens, hiddens) not mirrored yet."""

    seqs: list[SeqKV]
    pending_h: torch.Tensor | None = None
    lag: list = field(default_factory=list)

    @property
    def n_past(self) -> int:
        return self.seqs[0].n_past


@dataclass
class DraftJob:
    state: DraftState
    last: int  # the sampled token at position n_past, in no cache yet
    k: int  # tokens to draft
    pick: Callable  # logits [V] -> (token, q, probability): the slot's own draft sampler


class BatchedMTP:
    def __init__(
        self,
        model,
        n_slots: int,
        n_ctx: int,
        block_size: int,
        max_batch: int,
        type_k: str = "f16",
        type_v: str = "f16",
        device="cpu",
    ):
        layout = model.mtp_kv_layout()  # {il: LayerKV}, one NextN layer per head
        if not layout:
            raise LlmkitError("--mtp: this model has no NextN (MTP) blocks loaded")
        self.model, self.n_ctx, self.max_batch = model, n_ctx, max_batch
        self.pools = [
            PagedKV(
                {il: spec}, n_ctx * n_slots, block_size, n_slots, max_batch, type_k, type_v, device
            )
            for il, spec in sorted(layout.items())
        ]
        self.n_slots = n_slots
        self.chained = len(self.pools) > 1

    @property
    def n_heads(self) -> int:
        return len(self.pools)

    def plan(self) -> dict:
        total = sum(p.nbytes() for p in self.pools)
        return {
            "slots": self.n_slots,
            "heads": self.n_heads,
            "bytes": total,
            "bytes_per_slot": total // self.n_slots,
            "pools": [p.stats()["groups"] for p in self.pools],
        }

    def open(self) -> DraftState:
        seqs = [p.admit([], self.n_ctx, self.n_ctx, share=False) for p in self.pools]
        if any(s is None for s in seqs):  # the pools hold n_slots sequences: a bug if reached
            raise LlmkitError("MTP pools are full: more draft states open than slots")
        return DraftState(seqs)

    def close(self, st: DraftState) -> None:
        for pool, seq in zip(self.pools, st.seqs):
            pool.release(seq)

    def catch_up(self, states: list[DraftState]) -> None:
        """Mirror every state's lagging rows: rounds of up to max_batch rows per slot, each round
        one forward per head over all slots (row i pairs with the hidden of row i-1)."""
        work = []
        for st in states:
            if st.lag:
                toks = torch.cat([t for t, _ in st.lag])
                h = torch.cat([x for _, x in st.lag])
                work.append((st, toks, h))
                st.lag = []
        off = 0
        while True:
            rnd = [
                (st, t[off : off + self.max_batch], h[off : off + self.max_batch])
                for st, t, h in work
                if t.numel() > off
            ]
            if not rnd:
                return
            toks = torch.cat([t for _, t, _ in rnd])
            h_in = torch.cat(
                [
                    torch.cat(
                        (
                            (st.pending_h if st.pending_h is not None else torch.zeros_like(h[0]))[
                                None
                            ],
                            h[:-1],
                        )
                    )
                    for st, _, h in rnd
                ]
            )
            counts = [t.numel() for _, t, _ in rnd]
            for j, pool in enumerate(self.pools):
                bc = BatchCache(pool, [st.seqs[j] for st, _, _ in rnd], counts)
                self.model.mtp_forward(j, toks, h_in, bc, logits=None)  # KV only, no LM head
            for st, _, h in rnd:
                st.pending_h = h[-1]
            off += self.max_batch

    def draft(self, jobs: list[DraftJob], p_min: float = 0.0) -> list[tuple[list[int], list]]:
        """Draft for every job together (states caught up); returns (drafts, qs) per job. Every
        head's KV is trimmed back to the round's start afterwards."""
        p0 = [j.state.n_past for j in jobs]
        toks = [[j.last] for j in jobs]
        hs = [[j.state.pending_h] for j in jobs]
        out: list[tuple[list[int], list]] = [([], []) for _ in jobs]
        live = [j.k > 0 for j in jobs]
        steps = max((min(j.k, self.n_heads) if self.chained else j.k) for j in jobs) if jobs else 0
        for step in range(steps):
            act = [i for i, j in enumerate(jobs) if live[i] and j.k > step]
            if not act:
                break
            head = step if self.chained else 0
            pool = self.pools[head]
            if self.chained:  # head `step` re-decodes the whole draft prefix over its own KV
                rows = [toks[i] for i in act]
                h_rows = [torch.stack(hs[i]) for i in act]
                for i in act:
                    pool.truncate(jobs[i].state.seqs[head], p0[i])
            else:  # one head, one new row per step on top of the KV it wrote
                rows = [toks[i][-1:] for i in act]
                h_rows = [hs[i][-1][None] for i in act]
            counts = [len(r) for r in rows]
            bc = BatchCache(pool, [jobs[i].state.seqs[head] for i in act], counts)
            t = torch.tensor([x for r in rows for x in r])
            logits, h_out = self.model.mtp_forward(head, t, torch.cat(h_rows), bc, logits="all")
            end = 0
            for i, n in zip(act, counts):
                end += n
                tok, q, prob = jobs[i].pick(logits[end - 1])
                if prob < p_min:  # not confident: verify what this slot has (maybe nothing)
                    live[i] = False
                    continue
                out[i][0].append(tok)
                out[i][1].append(q)
                toks[i].append(tok)
                hs[i].append(h_out[end - 1])
        for i, j in enumerate(jobs):
            for pool, seq in zip(self.pools, j.state.seqs):
                pool.truncate(seq, p0[i])
        return out
