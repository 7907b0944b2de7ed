"""Drafters: what proposes tokens for speculative decoding. Every drafter speaks `Drafter` (one
sequence: `llm run`, `llm bench`) and the NextN one also drafts for many sequences at once
(`NextNDrafter`: the server's slots), so the decode loop and the server never special-case a kind.

The NextN (MTP) drafter keeps its own KV for the NextN layers, fed with the target's hidden states.
Alignment (llama.cpp's contract): the NextN row for the token at position p carries the trunk
hidden state of position p - 1 and predicts the token at p + 1. Every target batch is *observed*
(prompt chunks, the rows kept after each verification) and mirrored into the NextN caches, so each
holds exactly the positions the target has accepted. Observed rows queue until `catch_up` (the
server mirrors a slot only when it drafts again); rows a cache already holds are skipped.

Several NextN blocks (Step3.5 has 3) are *chained*: draft step j runs block j over the whole draft
prefix [last, d0, ..., d_{j-1}] (each block has its own KV, covering positions before the round),
so the draft length is capped at the number of blocks. A single block is reused autoregressively,
one new row per step on top of the KV it wrote. After drafting every cache is trimmed back to the
round's start, except the row of `last` at p0: that row (token `last`, the hidden of p0 - 1) is
exactly what mirroring would write, so the next mirror of that block starts one row later.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from llmkit.core.cache.batch import BatchCache
from llmkit.core.cache.kv import KVCache
from llmkit.core.cache.paged import PagedKV
from llmkit.core.decode.draft import Draft, Pick
from llmkit.core.model.protocol import DraftHeads
from llmkit.errors import LlmkitError

SINGLE_HEAD_MAX_DRAFT = 16  # one reused NextN block: drafts are capped by the verify batch
FOLD_MAX = 32  # queued rows a draft step mirrors in its own pass (more: a separate mirror pass)
# -- where a NextN drafter's KV lives ---------------------------------------------------------------


class ContiguousKV:
    """One KVCache per NextN head for one sequence (`llm run`): a batch is the cache itself."""

    def __init__(
        self, heads: DraftHeads, n_ctx: int, margin: int, type_k: str, type_v: str, device
    ):
        # one cache per NextN layer: chained heads decode different rows at different times
        self.caches = [
            KVCache({il: spec}, n_ctx, margin, type_k, type_v, device)
            for il, spec in sorted(heads.kv_layout().items())
        ]
        self.max_batch = margin

    def open(self) -> list:
        return list(self.caches)

    def close(self, seqs: list) -> None:
        pass

    def batch(self, head: int, seqs: list, counts: list[int]):
        return seqs[0]  # one sequence

    def truncate(self, head: int, seq: KVCache, p: int) -> None:
        seq.truncate(p)

    def plan(self) -> dict:
        plans = [c.plan() for c in self.caches]
        return {
            "layers": [il for p in plans for il in p["layers"]],
            "bytes": sum(c.nbytes() for c in self.caches),
            "type_k": plans[0]["type_k"] if plans else None,
            "type_v": plans[0]["type_v"] if plans else None,
            "groups": {
                f"{name}.blk{p['layers'][0]}": g for p in plans for name, g in p["groups"].items()
            },
        }


class PagedDraftKV:
    """The NextN layers' KV of every server slot in paged pools, one per head, reserved at start-up
    for n_slots sequences of n_ctx tokens (sized from the single-sequence shape of the NextN
    layers: a reserve-only plan, so opening a slot's state never fails or allocates). A batch
    over several sequences attends per sequence (BatchCache)."""

    def __init__(
        self, heads: DraftHeads, n_slots, n_ctx, block_size, max_batch, type_k, type_v, device
    ):
        self.pools = [
            PagedKV(
                {il: spec}, n_ctx * n_slots, block_size, n_slots, max_batch, type_k, type_v, device
            )
            for il, spec in sorted(heads.kv_layout().items())
        ]
        self.n_slots, self.n_ctx, self.max_batch = n_slots, n_ctx, max_batch

    def open(self) -> list:
        seqs = [p.admit([], self.n_ctx, self.n_ctx, share=False) for p in self.pools]
        if any(s is None for s in seqs):  # the pools hold n_slots sequences: a bug if reached
            raise LlmkitError("MTP pools are full: more draft states open than slots")
        return seqs

    def close(self, seqs: list) -> None:
        for pool, seq in zip(self.pools, seqs, strict=True):
            pool.release(seq)

    def batch(self, head: int, seqs: list, counts: list[int]):
        return BatchCache(self.pools[head], seqs, counts)

    def truncate(self, head: int, seq, p: int) -> None:
        self.pools[head].truncate(seq, p)

    def plan(self) -> dict:
        total = sum(p.nbytes() for p in self.pools)
        return {
            "slots": self.n_slots,
            "heads": len(self.pools),
            "bytes": total,
            "bytes_per_slot": total // self.n_slots,
            "pools": [p.stats()["groups"] for p in self.pools],
        }


# -- the NextN drafter ----------------------------------------------------------------------------


@dataclass
class DraftState:
    """One sequence's draft context: its KV in every head, the rows observed but not mirrored
    yet (position, tokens, paired hiddens), and the target hidden of the last observed row."""

    seqs: list  # per head: a KVCache or a paged SeqKV
    end: int = 0  # positions observed so far (mirrored or queued)
    pending_h: torch.Tensor | None = None  # [H] hidden of row end - 1: pairs with the next row
    lag: list = field(default_factory=list)


@dataclass
class DraftJob:
    state: DraftState
    last: int  # the sampled token at position state.end, in no cache yet
    k: int  # tokens to draft
    pick: Pick  # the sequence's own draft sampler
    branches: int = 1  # > 1: also return the first step's next most likely tokens


def _take_lag(st: DraftState) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A state's queued rows, dequeued: (first position, tokens, paired hiddens)."""
    p0 = st.lag[0][0]
    if len(st.lag) == 1:  # the usual round: one batch queued (no copy)
        _, toks, h_in = st.lag[0]
    else:
        toks, h_in = torch.cat([t for _, t, _ in st.lag]), torch.cat([x for _, _, x in st.lag])
    st.lag = []
    return p0, toks, h_in


class NextNDrafter:
    """Drafting with a model's NextN heads for any number of sequences: each draft step and each
    mirror round is one heads.forward over the rows of every sequence involved."""

    def __init__(self, heads: DraftHeads, kv):
        self.heads, self.kv = heads, kv
        self.n_heads = heads.n_heads
        self.chained = self.n_heads > 1

    def max_draft(self, requested: int) -> int:
        return min(requested, self.n_heads) if self.chained else requested

    def _pick(self, pick: Pick, z: torch.Tensor, ids: torch.Tensor | None, branches: int):
        """`pick` over one row of draft logits z (over the shortlist `ids`, or every token):
        (token, q over every token or None, p, the `branches` most likely tokens). A shortlist
        row gives the same choice as the full row with -inf outside it, without building it."""
        tok, q, prob = pick(z)
        if q is not None and ids is not None:  # the acceptance rule compares it with the
            q = q.new_zeros(self.heads.n_vocab).index_copy_(0, ids, q)  # target's [n_vocab] row
        if branches <= 1:  # no siblings: no tensor ops (each costs 10-30 us after a weight stream)
            return (tok if ids is None else int(ids[tok])), q, prob, []
        top = z.topk(branches).indices
        if ids is None:
            return tok, q, prob, top.tolist()
        return int(ids[tok]), q, prob, ids[top].tolist()

    shares_prefix = False  # mirroring needs the hidden state of every prompt row

    def open(self, target=None) -> DraftState:
        return DraftState(self.kv.open())

    def plan(self) -> dict:
        return self.kv.plan()

    def close(self, st: DraftState) -> None:
        self.kv.close(st.seqs)

    def observe(self, st: DraftState, p0: int, tokens: torch.Tensor, h: torch.Tensor) -> None:
        """Queue the target's rows at positions p0.. (h [T, H] their hidden states): row p is
        paired with the hidden of p - 1 (zeros at position 0). Rows before `st.end` are known."""
        T = tokens.numel()
        if p0 > st.end:
            raise LlmkitError(f"MTP context holds {st.end} positions, got rows from {p0}")
        skip = st.end - p0
        if skip < T:
            prev = st.pending_h if skip == 0 else h[skip - 1]
            prev = prev if prev is not None else torch.zeros_like(h[0])
            h_in = prev[None] if skip == T - 1 else torch.cat((prev[None], h[skip:-1]))
            st.lag.append((st.end, tokens[skip:], h_in))
            st.end, st.pending_h = p0 + T, h[-1]

    def rollback(self, st: DraftState, p: int) -> None:
        """Forget positions >= p (queued rows too); the hidden pairing with row p comes from the
        next observed batch (the target re-evaluates at least the row before it)."""
        if p >= st.end:
            return
        lag, st.lag = st.lag, []
        for q, toks, h_in in lag:
            if q < p:
                st.lag.append((q, toks[: p - q], h_in[: p - q]))
        for j, seq in enumerate(st.seqs):
            if seq.n_past > p:
                self.kv.truncate(j, seq, p)
        st.end, st.pending_h = p, None

    def catch_up(self, states: list[DraftState]) -> None:
        """Mirror every state's queued rows: rounds of up to kv.max_batch rows per state, each
        round one forward per head over all states; a head skips the rows it already holds."""
        work = [(st, *_take_lag(st)) for st in states if st.lag]
        for j in range(self.n_heads):
            rows = []  # (state, tokens, paired hiddens) this head lacks
            for st, p0, toks, h_in in work:
                skip = max(0, st.seqs[j].n_past - p0)
                if skip < toks.numel():
                    rows.append((st, toks[skip:], h_in[skip:]))
            for off in range(0, max((t.numel() for _, t, _ in rows), default=0), self.kv.max_batch):
                rnd = [(st, t[off : off + self.kv.max_batch], x[off : off + self.kv.max_batch])
                       for st, t, x in rows if t.numel() > off]  # fmt: skip
                cache = self.kv.batch(
                    j, [st.seqs[j] for st, _, _ in rnd], [t.numel() for _, t, _ in rnd]
                )
                toks = torch.cat([t for _, t, _ in rnd])
                self.heads.forward(j, toks, torch.cat([x for _, _, x in rnd]), cache, logits=None)

    def _fold_lag(self, jobs: list[DraftJob]) -> dict:
        """The queued rows a single head mirrors inside the first draft step (job index ->
        (tokens, paired hiddens) it lacks): one block pass over [lag..., last] instead of a
        mirror pass and a draft pass, which reads the block's weights once per round. Chained
        heads, jobs that draft nothing and long lags (a prompt) are caught up first."""
        fold, rest = {}, []
        for i, j in enumerate(jobs):
            st = j.state
            n_lag = sum(t.numel() for _, t, _ in st.lag)
            if not n_lag:
                continue
            if self.chained or j.k <= 0 or n_lag + 1 > min(FOLD_MAX, self.kv.max_batch):
                rest.append(st)
                continue
            p_lag, toks, h_in = _take_lag(st)
            skip = max(0, st.seqs[0].n_past - p_lag)
            if skip < toks.numel():
                fold[i] = (toks[skip:].tolist(), h_in[skip:])
        if rest:
            self.catch_up(rest)
        return fold

    def draft(self, jobs: list[DraftJob], p_min: float = 0.0) -> list[Draft]:
        """Draft for every job together (rows still queued are mirrored first, or folded into
        the first step: _fold_lag). Caches are trimmed back to each round's start, keeping the
        row of `last` in every head that ran."""
        lag = self._fold_lag(jobs)
        p0 = [j.state.end for j in jobs]
        toks = [[j.last] for j in jobs]
        hs = [[j.state.pending_h] for j in jobs]
        out = [Draft() for _ in jobs]
        live = [j.k > 0 for j in jobs]
        ran = [[False] * self.n_heads for _ in jobs]
        for step in range(max((self.max_draft(j.k) for j in jobs), default=0)):
            act = [i for i, j in enumerate(jobs) if live[i] and self.max_draft(j.k) > step]
            if not act:
                break
            head = step if self.chained else 0
            if self.chained:  # head `step` re-decodes the whole draft prefix over its own KV
                rows = [toks[i] for i in act]
                h_rows = [torch.stack(hs[i]) for i in act]
                for i in act:
                    self.kv.truncate(head, jobs[i].state.seqs[head], p0[i])
            else:  # one head, one new row per step on top of the KV it wrote; the first
                # step also mirrors the rows observed since the last round (folded: one pass)
                rows, h_rows = [], []
                for i in act:
                    lt, lh = lag.pop(i, ([], None))
                    rows.append(lt + toks[i][-1:])
                    h_last = hs[i][-1][None]
                    h_rows.append(h_last if lh is None else torch.cat((lh, h_last)))
            counts = [len(r) for r in rows]
            cache = self.kv.batch(head, [jobs[i].state.seqs[head] for i in act], counts)
            t = torch.tensor([x for r in rows for x in r])
            ends = list(itertools.accumulate(counts))
            h_in = h_rows[0] if len(h_rows) == 1 else torch.cat(h_rows)
            h_out, z, ids = self.heads.draft_step(head, t, h_in, cache, [e - 1 for e in ends])
            for r, (i, end) in enumerate(zip(act, ends, strict=True)):
                ran[i][head] = True
                b = jobs[i].branches if step == 0 else 1
                tok, q, prob, alts = self._pick(jobs[i].pick, z[r], ids, b)
                if prob < p_min:  # not confident: verify what this sequence has (maybe nothing)
                    live[i] = False
                    continue
                out[i].alts = [a for a in alts if a != tok][: b - 1] if b > 1 else out[i].alts
                out[i].tokens.append(tok)
                out[i].qs.append(q)
                toks[i].append(tok)
                hs[i].append(h_out[end - 1])
        for i, j in enumerate(jobs):  # drop the draft rows, keep the mirrored one
            for head, seq in enumerate(j.state.seqs):
                self.kv.truncate(head, seq, p0[i] + ran[i][head])
        return out


class MTPDrafter:
    """The `Drafter` of one sequence over the model's NextN heads (`llm run`, `llm bench`)."""

    def __init__(
        self, heads: DraftHeads, n_ctx: int, margin: int, type_k="f16", type_v="f16", device="cpu"
    ):
        self.kv = ContiguousKV(heads, n_ctx, margin, type_k, type_v, device)
        self.core = NextNDrafter(heads, self.kv)
        self.state = self.core.open()
        self.max_draft = heads.n_heads if self.core.chained else SINGLE_HEAD_MAX_DRAFT

    @property
    def caches(self) -> list[KVCache]:
        """The NextN caches, holding every observed row (queued rows are mirrored first)."""
        self.core.catch_up([self.state])
        return self.kv.caches

    @property
    def n_past(self) -> int:
        return self.state.end

    def observe(self, p0: int, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """Queue the rows: the next draft mirrors them in its first pass (NextNDrafter.draft)."""
        self.core.observe(self.state, p0, tokens, hidden)

    def draft(self, last: int, k: int, pick: Pick, p_min: float = 0.0, branches: int = 1) -> Draft:
        return self.core.draft([DraftJob(self.state, last, k, pick, branches)], p_min)[0]

    def rollback(self, p: int) -> None:
        self.core.rollback(self.state, p)

    def plan(self) -> dict:
        return self.kv.plan()
