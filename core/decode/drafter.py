"""The MTP (NextN) draft context: its own KV caches holding only the NextN layers, fed with the
target's hidden states.

Alignment (llama.cpp's contract): the MTP row for the token at position p carries the trunk hidden
state of position p-1 and predicts the token at p+1. Every target batch is *mirrored* here (prompt
chunks during prefill, accepted tokens after each verification), so each NextN layer's cache holds
exactly the positions the target has accepted.

Several NextN blocks (Step3.5 has 3) are *chained*: draft step j runs block j over the whole draft
prefix [last, d0, ..., d_{j-1}] (each block has its own KV, which only covers positions before the
round), so the draft length is capped at the number of blocks. A single block is reused
autoregressively, one new row per step on top of the KV it wrote. After drafting, every cache is
trimmed back to the round's start: draft rows are re-mirrored from the target after verification.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmkit.core.cache.kv import KVCache

# pick(logits [V]) -> (token, q) where q is the dense draft distribution it was drawn from (None if
# greedy) and its probability of the chosen token is used by --draft-p-min
Pick = Callable[[torch.Tensor], tuple[int, torch.Tensor | None, float]]


class MTPContext:
    def __init__(
        self, model, n_ctx: int, margin: int, type_k: str = "f16", type_v: str = "f16", device="cpu"
    ):
        self.model = model
        layout = model.mtp_kv_layout()  # {il: LayerKV}, NextN layers only
        # one cache per NextN layer: chained heads decode different rows at different times
        self.caches = [
            KVCache({il: spec}, n_ctx, margin, type_k, type_v, device)
            for il, spec in sorted(layout.items())
        ]
        self.n_heads = len(self.caches)
        self.chained = self.n_heads > 1
        self.pending_h: torch.Tensor | None = None  # [H] trunk hidden paired with the next token
        # cache j already holds the row of the last draft round's first token: that row (token
        # `last`, the target's hidden pending_h) is exactly what mirroring would write, so
        # drafting keeps it and the next mirror starts one row later (none at all on rejection)
        self.first_row = [False] * self.n_heads

    @property
    def n_past(self) -> int:
        return self.caches[0].n_past

    def max_draft(self, requested: int) -> int:
        return min(requested, self.n_heads) if self.chained else requested

    def mirror(self, tokens: torch.Tensor, h: torch.Tensor) -> None:
        """Teacher-force a target batch: tokens [T] at the next positions, h [T, H] the target's
        hidden states for those same rows. Row i is paired with h[i-1] (the first row with the
        hidden carried over from the previous batch, zeros at position 0)."""
        prev = self.pending_h if self.pending_h is not None else torch.zeros_like(h[0])
        h_in = torch.cat((prev[None], h[:-1]))  # [T, H]
        for j, cache in enumerate(self.caches):
            skip = int(self.first_row[j])  # after a draft round tokens[0] is its `last`
            if tokens.numel() > skip:  # KV only, no LM head
                self.model.mtp_forward(j, tokens[skip:], h_in[skip:], cache, logits=None)
            self.first_row[j] = False
        self.pending_h = h[-1]

    def truncate(self, p: int) -> None:
        for c in self.caches:
            c.truncate(p)
        self.first_row = [False] * self.n_heads

    def draft(self, last: int, n_draft: int, pick: Pick, p_min: float = 0.0, branches: int = 1):
        """Draft up to n_draft tokens after `last` (the sampled token at position n_past, not yet in
        any cache). Returns (tokens, q distributions, alternatives): with branches > 1 (greedy
        drafting) the alternatives are the first step's next branches - 1 most likely tokens after
        the drafted one, which a draft tree verifies beside it. The next `mirror` must start with
        `last`."""
        p0 = self.n_past
        toks, hs = [last], [self.pending_h]
        drafts, qs, alts = [], [], []
        ran = [False] * self.n_heads  # caches that now hold the (last, pending_h) row at p0
        for j in range(self.max_draft(n_draft)):
            ran[j if self.chained else 0] = True
            if self.chained:  # block j re-decodes the whole draft prefix over its own KV
                cache = self.caches[j]
                cache.truncate(p0)
                logits, h_out = self.model.mtp_forward(
                    j, torch.tensor(toks), torch.stack(hs), cache, logits="last"
                )
            else:  # one block, one new row per step
                logits, h_out = self.model.mtp_forward(
                    0, torch.tensor(toks[-1:]), hs[-1][None], self.caches[0], logits="last"
                )
            tok, q, prob = pick(logits[0])
            if prob < p_min:  # not confident enough: verify what we have (possibly nothing)
                break
            if j == 0 and branches > 1:
                top = logits[0].topk(branches).indices.tolist()
                alts = [t for t in top if t != tok][: branches - 1]
            drafts.append(tok)
            qs.append(q)
            toks.append(tok)
            hs.append(h_out[-1])
        for j, cache in enumerate(self.caches):  # drop the draft rows, keep the mirrored one
            cache.truncate(p0 + ran[j])
        self.first_row = ran
        return drafts, qs, alts

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def plan(self) -> dict:
        plans = [c.plan() for c in self.caches]
        return {
            "layers": [il for p in plans for il in p["layers"]],
            "bytes": self.nbytes(),
            "type_k": plans[0]["type_k"] if plans else None,
            "type_v": plans[0]["type_v"] if plans else None,
            "groups": {
                f"{name}.blk{p['layers'][0]}": g for p in plans for name, g in p["groups"].items()
            },
        }
