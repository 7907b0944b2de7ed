"""One forward pass over several sequences of a paged KV pool (the server's batched decode).

`BatchCache` speaks the KVCache interface the models use (positions, begin, update, attention):
rows are grouped by sequence in the order given, each row gets its own sequence's position, K/V
are written into that sequence's blocks, and attention runs per sequence over that sequence's keys
only. Linear layers see all rows at once. Attention is deliberately not one call over the
concatenated keys with a block-diagonal mask: SDPA's reductions then depend on where a sequence's
keys sit in the concatenation, so a row's result would change (in the last bits) with its batch
neighbours; per-sequence calls keep every row's attention arithmetic that of a lone run.
"""

from __future__ import annotations

import torch

from llmkit.core.cache import turbo
from llmkit.core.cache.paged import PagedKV, SeqKV, SeqView
from llmkit.core.cache.store import KV_TYPES
from llmkit.errors import LlmkitError
from llmkit.kernels import ops


class BatchCache:
    def __init__(self, pool: PagedKV, seqs: list[SeqKV], counts: list[int]):
        if len(seqs) != len(counts) or not seqs or min(counts) < 1:
            raise LlmkitError("a batch needs at least one row for each of its sequences")
        self.pool, self.seqs, self.counts = pool, seqs, counts
        bounds = [0]
        for n in counts:
            bounds.append(bounds[-1] + n)
        self.rows = list(zip(bounds[:-1], bounds[1:]))
        self.views: list[SeqView] = []
        self._pos: torch.Tensor | None = None  # the batch's positions (begin)

    def positions(self, T: int) -> torch.Tensor:
        if T != self.rows[-1][1]:
            raise LlmkitError(f"batch of {T} rows, but its sequences hold {self.rows[-1][1]}")
        return torch.cat(
            [torch.arange(s.n_past, s.n_past + n) for s, n in zip(self.seqs, self.counts)]
        )

    def begin(self, pos: torch.Tensor) -> None:
        self._pos = pos
        self.views = [self.pool.prepare(s, n) for s, n in zip(self.seqs, self.counts)]

    def update(self, il: int, k: torch.Tensor, v: torch.Tensor):
        """Write each sequence's rows of k/v [T, Hkv, D]; return per-sequence (K, V, mask) lists."""
        g = self.pool.group_of[il].name
        Ks, Vs, masks = [], [], []
        for view, (r0, r1) in zip(self.views, self.rows):
            self.pool.write(il, view.write[g], k[r0:r1], v[r0:r1])
            K, V = self.pool.read(il, view.read[g])
            Ks.append(K)
            Vs.append(V)
            masks.append(view.mask[g])
        return Ks, Vs, masks

    def attention(self, q, Ks, Vs, masks, scale: float) -> torch.Tensor:
        return torch.cat(
            [
                turbo.attention(q[r0:r1], K, V, m, scale, self.pool.type_k, self.pool.type_v)
                for (r0, r1), K, V, m in zip(self.rows, Ks, Vs, masks)
            ]
        )

    def publish(self) -> None:
        """After the forward: offer the prompt blocks it completed to later requests."""
        for s in self.seqs:
            self.pool.publish(s)

    def native_step(self, il: int) -> None:
        return None  # paged: each sequence's blocks are read through its own index

    def native_stack(self, layers: tuple[int, ...]) -> None:
        return None

    def attend(self, il: int, q, k, v, scale: float) -> torch.Tensor:
        """update + attention for layer il (the call a model block makes). The native kernel
        reads each sequence's blocks in place, in logical order, under its mask."""
        pool = self.pool
        if pool.attn_kernel != "native":
            return self.attention(q, *self.update(il, k, v), scale)
        g = pool.group_of[il]
        kt, vt = KV_TYPES[pool.type_k], KV_TYPES[pool.type_v]
        pos, outs = self._pos, []
        for view, (r0, r1) in zip(self.views, self.rows, strict=True):
            ops.kv_store_native(g.k[il], kt, view.write[g.name], k[r0:r1])
            ops.kv_store_native(g.v[il], vt, view.write[g.name], v[r0:r1])
            idx = view.read[g.name]
            outs.append(
                ops.attention_native(
                    q[r0:r1],
                    g.k[il],
                    kt,
                    g.v[il],
                    vt,
                    v.shape[-1],
                    idx.numel(),
                    None,
                    pos[r0:r1],
                    scale,
                    None,
                    view.mask[g.name],
                    idx,
                )  # fmt: skip
            )
        return torch.cat(outs) if len(outs) > 1 else outs[0]
