"""Paged KV cache for the server: one pool of fixed-size blocks per layer group, a block table per
sequence, prefix sharing by content with reference counts and copy-on-write, sliding-window groups
that give back blocks which fell out of the window, and per-sequence reservations so that an admitted
request can never run out of blocks half-way (requests that do not fit wait; nothing crashes).

Storage keeps KVCache's flat per-layer layout, K [Hkv, n_blocks * bs, D], so its typed store/load
(f16/bf16/f32/q8_0/q4_0) is reused: position p of a sequence lives in slot table[p // bs] * bs +
p % bs. Attention reads a sequence's live blocks in logical order and masks by position, exactly as
the contiguous cache does. Paging saves fragmentation (no n_ctx-sized buffer per slot) and shares
prefixes; it does not shrink the bytes per token.

Sharing: every block that is completely filled with *prompt* tokens is published under a digest of
the whole prefix up to its end (a hash chain), so a later prompt with the same prefix takes those
blocks instead of recomputing them. A block that is shared (refcount > 1) or published is never
written in place: the first write copies it (copy-on-write), e.g. when a prompt that is entirely
cached re-evaluates its last token. Released published blocks stay in an LRU list, reusable until
a new allocation needs the space.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

# the contiguous cache's typed buffers and writer: the same per-layer layout and element types
from llmkit.core.cache.layout import LayerKV
from llmkit.core.cache.store import KV_TYPES, alloc, buffer_bytes, check_fits, gather, store
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.backend import default_family


@dataclass
class Group:
    """Blocks of the layers that share a geometry (full attention, or one sliding window)."""

    name: str
    window: int | None
    n_blocks: int
    layers: list[int] = field(default_factory=list)
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # il -> [Hkv, n_blocks * bs, Dk]
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    ref: list[int] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    lru: OrderedDict = field(default_factory=OrderedDict)  # refcount-0 published blocks
    key_of: dict[int, bytes] = field(default_factory=dict)  # block -> prefix digest
    block_of: dict[bytes, int] = field(default_factory=dict)  # prefix digest -> block
    promised: int = 0  # blocks reserved by admitted sequences and not allocated yet

    @property
    def available(self) -> int:
        return len(self.free) + len(self.lru) - self.promised

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free) - len(self.lru)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


@dataclass
class SeqKV:
    """One sequence's view of the pool."""

    n_ctx: int
    tables: dict[str, list[int]]  # group -> block per logical block (-1: none / freed)
    cap: dict[str, int]  # most blocks this sequence may own at once (its reservation)
    owned: dict[str, set[int]]  # blocks it allocated (the shared ones belong to the pool)
    digests: list[bytes]  # prefix digest of each full prompt block
    n_past: int = 0
    n_shared: int = 0  # prompt tokens taken from the prefix cache
    released: bool = False


@dataclass
class SeqView:
    """What one forward needs from one sequence, per group: write slots, read slots, mask."""

    write: dict[str, torch.Tensor]
    read: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]


def prefix_digests(tokens: list[int], bs: int) -> list[bytes]:
    """Digest of tokens[: (i + 1) * bs] for every full block i (a chain: each covers the prefix)."""
    out, prev = [], b""
    arr = np.asarray(tokens, dtype=np.int64)
    for i in range(len(tokens) // bs):
        prev = hashlib.blake2b(prev + arr[i * bs : (i + 1) * bs].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PagedKV:
    def __init__(
        self,
        layers: dict[int, LayerKV],
        n_tokens: int,
        block_size: int = 16,
        n_seq_max: int = 1,
        max_batch: int = 512,
        type_k: str = "f16",
        type_v: str = "f16",
        device: torch.device | str = "cpu",
    ):
        if block_size < 1:
            raise LlmkitError(f"--kv-block-size must be >= 1, got {block_size}")
        for name, t in (("K", type_k), ("V", type_v)):
            if t not in KV_TYPES:
                raise LlmkitError(
                    f"unsupported {name} cache type {t} (supported: {', '.join(KV_TYPES)})"
                )
        self.bs, self.type_k, self.type_v = block_size, type_k, type_v
        # native on a CPU with the library built, else SDPA over each sequence's gathered keys
        self.attn_kernel = "native" if default_family(device) == "cpu" else "torch"
        self.attn_kernel = ops.kv_attention_kernel(self.attn_kernel, type_k, type_v)  # turbo: torch
        self.max_batch = max_batch
        n_full = math.ceil(n_tokens / block_size)
        self.groups: dict[str, Group] = {}
        self.group_of: dict[int, Group] = {}
        total = 0
        for spec in layers.values():  # sized and checked before any allocation
            n = n_full if spec.window is None else min(n_full, n_seq_max * self._swa_cap(spec))
            total += buffer_bytes(type_k, spec.n_head_kv, n * block_size, spec.head_dim_k)
            total += buffer_bytes(type_v, spec.n_head_kv, n * block_size, spec.head_dim_v)
        check_fits(total, device, f"the KV pool for {n_tokens} tokens")
        for il, spec in sorted(layers.items()):
            gname = "full" if spec.window is None else f"swa{spec.window}"
            g = self.groups.get(gname)
            if g is None:
                # a sliding group never needs more live blocks per sequence than its window span
                n = n_full if spec.window is None else min(n_full, n_seq_max * self._swa_cap(spec))
                g = self.groups[gname] = Group(gname, spec.window, n)
                g.ref, g.free = [0] * n, list(range(n - 1, -1, -1))
            cells = g.n_blocks * block_size
            g.layers.append(il)
            g.k[il] = alloc(type_k, spec.n_head_kv, cells, spec.head_dim_k, device)
            g.v[il] = alloc(type_v, spec.n_head_kv, cells, spec.head_dim_v, device)
            self.group_of[il] = g
        self.prefix_hits = 0  # requests that reused at least one cached block
        self.prefix_tokens = 0  # prompt tokens those requests did not recompute

    def _swa_cap(self, spec: LayerKV) -> int:
        # live keys of one batch: the window before its first position plus the batch itself
        return math.ceil((spec.window + self.max_batch) / self.bs) + 1

    # -- admission ----------------------------------------------------------------------------
    def blocks_needed(self, g: Group, n_tokens: int) -> int:
        n = math.ceil(n_tokens / self.bs)
        if g.window is not None:
            n = min(n, math.ceil((g.window + self.max_batch) / self.bs) + 1)
        return n

    def fits_ever(self, n_tokens: int) -> bool:
        """Whether a sequence of n_tokens fits an otherwise empty pool."""
        return all(self.blocks_needed(g, n_tokens) <= g.n_blocks for g in self.groups.values())

    def admit(self, prompt: list[int], n_tokens: int, n_ctx: int, share: bool = True):
        """Open a sequence whose prompt is `prompt` and that will hold at most n_tokens positions;
        None when the blocks it may need are not free now (the caller defers it)."""
        digests = prefix_digests(prompt, self.bs)
        seq = SeqKV(
            n_ctx, {n: [] for n in self.groups}, {}, {n: set() for n in self.groups}, digests
        )
        if share:
            self._claim_prefix(seq, len(prompt))
        for g in self.groups.values():
            # new blocks = all blocks minus the ones already taken from the cache, plus one
            # copy-on-write of a shared block the prompt's last token is re-evaluated into
            shared = sum(b >= 0 for b in seq.tables[g.name])
            cap = self.blocks_needed(g, n_tokens)
            if g.window is None:
                cap = max(1, cap - shared + (seq.n_past % self.bs != 0))
            seq.cap[g.name] = cap
        if any(seq.cap[n] > g.available for n, g in self.groups.items()):
            self._drop_tables(seq)
            return None
        for n, g in self.groups.items():
            g.promised += seq.cap[n]
        if seq.n_shared:
            self.prefix_hits += 1
            self.prefix_tokens += seq.n_shared
        return seq

    def _claim_prefix(self, seq: SeqKV, n_prompt: int) -> None:
        bs = self.bs
        j = len(seq.digests)
        while j > 0:
            L = min(j * bs, n_prompt - 1)  # at least one prompt token is evaluated (its logits)
            if all(
                all(d in g.block_of for d in self._needed(g, seq.digests, j, L))
                for g in self.groups.values()
            ):
                break
            j -= 1
        if j == 0:
            return
        L = min(j * bs, n_prompt - 1)
        for g in self.groups.values():
            lo = self._lo(g, L)
            table = seq.tables[g.name]
            for i in range(j):
                if i < lo:
                    table.append(-1)
                    continue
                b = g.block_of[seq.digests[i]]
                if g.ref[b] == 0:
                    del g.lru[b]
                g.ref[b] += 1
                table.append(b)
        seq.n_past = seq.n_shared = L

    def _lo(self, g: Group, L: int) -> int:
        # first logical block the continuation from position L still attends to
        return 0 if g.window is None else max(0, L - g.window + 1) // self.bs

    def _needed(self, g: Group, digests: list[bytes], j: int, L: int) -> list[bytes]:
        return digests[self._lo(g, L) : j]

    # -- per forward ----------------------------------------------------------------------------
    def prepare(self, seq: SeqKV, T: int) -> SeqView:
        """Reserve positions n_past .. n_past+T-1 (allocating / copying blocks), publish full
        prompt blocks, free sliding blocks no query can reach any more; return the batch view."""
        if seq.released:
            raise LlmkitError("KV sequence was already released")
        bs, p0, p1 = self.bs, seq.n_past, seq.n_past + T
        if T > self.max_batch:  # sliding-group reservations are sized for this batch
            raise LlmkitError(f"batch of {T} rows exceeds the KV pool's {self.max_batch}")
        if p1 > seq.n_ctx:
            raise LlmkitError(f"context is full: {p1} tokens exceed the context size {seq.n_ctx}")
        pos = torch.arange(p0, p1)
        view = SeqView({}, {}, {})
        for g in self.groups.values():
            table = seq.tables[g.name]
            if g.window is not None:  # keys below p0 - W + 1 are out of every future window
                for i in range(min(len(table), max(0, p0 - g.window + 1) // bs)):
                    if table[i] >= 0:
                        self._unref(g, seq, table[i])
                        table[i] = -1
            while len(table) * bs < p1:
                table.append(-1)
            for i in range(p0 // bs, (p1 - 1) // bs + 1):
                b = table[i]
                if b < 0:
                    table[i] = self._alloc(g, seq)
                elif g.ref[b] > 1 or b in g.key_of:
                    table[i] = self._copy(g, seq, b)
            blocks = torch.tensor(table, dtype=torch.int64)
            view.write[g.name] = blocks[pos // bs] * bs + pos % bs
            live = torch.nonzero(blocks >= 0).flatten()
            offs = torch.arange(bs)
            kp = (live[:, None] * bs + offs).flatten()  # key positions, logical order
            view.read[g.name] = (blocks[live][:, None] * bs + offs).flatten()
            m = (kp[None, :] < p1) & (kp[None, :] <= pos[:, None])
            if g.window is not None:
                m &= pos[:, None] - kp[None, :] < g.window
            view.mask[g.name] = m
        seq.n_past = p1
        return view

    def publish(self, seq: SeqKV) -> None:
        """Offer the full prompt blocks written so far to later requests (call after the forward
        that wrote them: a published block must hold its final values)."""
        for i in range(min(seq.n_past // self.bs, len(seq.digests))):
            d = seq.digests[i]
            for g in self.groups.values():
                b = seq.tables[g.name][i]
                if b >= 0 and b not in g.key_of and d not in g.block_of:
                    g.key_of[b], g.block_of[d] = d, b

    def write(self, il: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        g = self.group_of[il]
        store(g.k[il], self.type_k, slots, k)
        store(g.v[il], self.type_v, slots, v)

    def read(self, il: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.group_of[il]
        return gather(g.k[il], self.type_k, idx), gather(g.v[il], self.type_v, idx)

    def truncate(self, seq: SeqKV, p: int) -> None:
        """Forget positions >= p (speculative rollback); blocks past the end go back to the pool."""
        if p >= seq.n_past:
            return
        if p < seq.n_shared:
            raise LlmkitError(f"cannot roll back into the shared prefix ({p} < {seq.n_shared})")
        keep = math.ceil(p / self.bs)
        for g in self.groups.values():
            table = seq.tables[g.name]
            for b in table[keep:]:
                if b >= 0:
                    self._unref(g, seq, b)
            del table[keep:]
        seq.n_past = p

    def release(self, seq: SeqKV) -> None:
        """Give back every block and the unused reservation (request finished or cancelled)."""
        if seq.released:
            return
        for n, g in self.groups.items():
            g.promised -= seq.cap[n] - len(seq.owned[n])
        self._drop_tables(seq)
        seq.released = True

    def _drop_tables(self, seq: SeqKV) -> None:
        for n, g in self.groups.items():
            for b in seq.tables[n]:
                if b >= 0:
                    self._decref(g, b)
            seq.tables[n] = []
            seq.owned[n] = set()

    # -- blocks ---------------------------------------------------------------------------------
    def _alloc(self, g: Group, seq: SeqKV) -> int:
        if len(seq.owned[g.name]) >= seq.cap[g.name]:
            raise LlmkitError(f"KV sequence outgrew its {g.name} reservation")  # a bug, not input
        if g.free:
            b = g.free.pop()
        else:  # the reservation guarantees an evictable cached block
            b, _ = g.lru.popitem(last=False)
            del g.block_of[g.key_of.pop(b)]
        g.ref[b] = 1
        g.promised -= 1
        seq.owned[g.name].add(b)
        return b

    def _copy(self, g: Group, seq: SeqKV, src: int) -> int:
        dst = self._alloc(g, seq)
        bs = self.bs
        for il in g.layers:
            for buf in (g.k[il], g.v[il]):
                buf[:, dst * bs : (dst + 1) * bs] = buf[:, src * bs : (src + 1) * bs]
        self._unref(g, seq, src)
        return dst

    def _unref(self, g: Group, seq: SeqKV, b: int) -> None:
        if b in seq.owned[g.name]:
            seq.owned[g.name].discard(b)
            g.promised += 1  # the reservation covers the live blocks: a freed one can come back
        self._decref(g, b)

    def _decref(self, g: Group, b: int) -> None:
        g.ref[b] -= 1
        if g.ref[b] == 0:
            if b in g.key_of:
                g.lru[b] = None
            else:
                g.free.append(b)

    # -- reporting --------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups.values())

    def stats(self) -> dict:
        per_token = sum(g.nbytes() // (g.n_blocks * self.bs) for g in self.groups.values())
        return {
            "block_size": self.bs,
            "bytes": self.nbytes(),
            "bytes_per_token": per_token,  # K+V of all layers: paging does not change it
            "type_k": self.type_k,
            "type_v": self.type_v,
            "prefix_hits": self.prefix_hits,
            "prefix_tokens": self.prefix_tokens,
            "groups": {
                g.name: {
                    "layers": g.layers,
                    "window": g.window,
                    "blocks_total": g.n_blocks,
                    "blocks_used": g.used,
                    "blocks_cached": len(g.lru),
                    "blocks_reserved": g.promised,
                    "bytes": g.nbytes(),
                }
                for g in self.groups.values()
            },
        }
