"""Preallocated per-layer KV buffers, written by index; sliding-window layers keep a ring.

Layers are grouped by slot geometry (the model declares it): a *full* group has one slot per
position of the context; a *sliding* group (window W) has a ring of W + margin slots, slot = pos mod
capacity. Every group remembers which position each slot holds (`slot_pos`, -1 = empty), so the
attention mask is computed from positions, never from slot order, and a rollback (`truncate`) only
has to forget positions. The margin is what lets a batch of up to `margin` new tokens (a prefill chunk
or a speculative verify batch) be written before attention reads it, and what keeps positions that
are still needed after a rollback from being overwritten (llama.cpp sizes its SWA cache n_swa +
n_ubatch for the same reasons).
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.cache import turbo
from llmkit.core.cache.layout import LayerKV, check_window_kept
from llmkit.core.cache.store import KV_TYPES, alloc, buffer_bytes, check_fits, load, store
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.backend import default_family


@dataclass
class _Group:
    name: str
    window: int | None
    capacity: int
    layers: list[int]
    slot_pos: torch.Tensor  # [capacity] int64, -1 = empty
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # il -> [Hkv, capacity, Dk]
    v: dict[int, torch.Tensor] = field(default_factory=dict)  # il -> [Hkv, capacity, Dv]
    # per batch, set by begin():
    slots: torch.Tensor | None = None
    n_read: int = 0
    mask: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


class KVCache:
    def __init__(
        self,
        layers: dict[int, LayerKV],
        n_ctx: int,
        margin: int = 512,
        type_k: str = "f16",
        type_v: str = "f16",
        device: torch.device | str = "cpu",
        attn_kernel: str | None = None,
    ):
        for name, t in (("K", type_k), ("V", type_v)):
            if t not in KV_TYPES:
                raise LlmkitError(
                    f"unsupported {name} cache type {t} (supported: {', '.join(KV_TYPES)})"
                )
        self.n_ctx, self.margin = n_ctx, margin
        self.type_k, self.type_v = type_k, type_v
        self.groups: dict[str, _Group] = {}
        self.group_of: dict[int, _Group] = {}
        if n_ctx < 1:
            raise LlmkitError(f"context size must be at least 1, got {n_ctx}")
        plan = []  # (il, spec, group name, slots): sized and checked before any allocation
        for il, spec in sorted(layers.items()):
            if spec.window is None:
                plan.append((il, spec, "full", n_ctx))
            else:
                plan.append((il, spec, f"swa{spec.window}", min(n_ctx, spec.window + margin)))
        total = sum(
            buffer_bytes(type_k, s.n_head_kv, cap, s.head_dim_k)
            + buffer_bytes(type_v, s.n_head_kv, cap, s.head_dim_v)
            for _, s, _, cap in plan
        )
        check_fits(total, device, f"the KV cache for a context of {n_ctx} tokens")
        for il, spec, gname, cap in plan:
            g = self.groups.get(gname)
            if g is None:
                pos = torch.full((cap,), -1, dtype=torch.int64, device=device)
                g = self.groups[gname] = _Group(gname, spec.window, cap, [], pos)
            g.layers.append(il)
            g.k[il] = alloc(type_k, spec.n_head_kv, cap, spec.head_dim_k, device)
            g.v[il] = alloc(type_v, spec.n_head_kv, cap, spec.head_dim_v, device)
            self.group_of[il] = g
        self._dv = {il: spec.head_dim_v for il, spec in layers.items()}
        self.n_past = 0  # positions 0..n_past-1 are cached
        # the last slot sequence index written (slot = index mod capacity; a tree batch's row i
        # is index n_past + i): no slot of a position q was overwritten while this < q + capacity
        self._high = -1
        self._arange: torch.Tensor | None = None  # 0..n_ctx - 1: positions and slots as views
        self._given: tuple = (None, -1)  # positions() last returned (tensor, at n_past)
        self.device = torch.device(device)
        # the kernel table picks by device (kernels/ops.py): "torch" (SDPA over a [T, S] mask) or
        # "triton" (reads the cache as stored, masks by slot position)
        self.attn_kernel = attn_kernel or ops.attention_kernel(default_family(self.device))
        self.attn_kernel = ops.kv_attention_kernel(self.attn_kernel, type_k, type_v)  # turbo: torch
        ops.check_attention_kernel(self.attn_kernel)
        self._pos: torch.Tensor | None = None  # positions of the current batch
        self._group: _Group | None = None  # group of the layer last updated (for attention)
        self._static: tuple[torch.Tensor, int] | None = None  # see static_batch()
        self._tree: tuple[torch.Tensor, torch.Tensor] | None = None  # see tree_batch()
        self._native: dict = {}  # il -> the native attention step bound to its buffers
        self._stacks: dict = {}  # layers -> their bound K/V pointers for native_stack
        self._stack_masks: list = []

    @property
    def layers(self) -> list[int]:
        return sorted(self.group_of)

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T tokens. Models ask the cache (rather than counting from n_past)
        so that a multi-sequence batch cache can give every row its own sequence's position."""
        if self._static is not None:
            return self._static[0]
        if self._tree is not None:
            return self.n_past + self._tree[0]
        pos = self._span(self.n_past, self.n_past + T)
        self._given = (pos, self.n_past)
        return pos

    def _span(self, a: int, b: int) -> torch.Tensor:
        """a..b-1 as int64 (b <= n_ctx: a view of one table; a small op costs 10-30 us right
        after a streamed weight matrix evicted the caches, a view the least of them)."""
        if b > self.n_ctx:
            return torch.arange(a, b, device=self.device)
        if self._arange is None:
            self._arange = torch.arange(self.n_ctx, device=self.device)
        return self._arange[a:b]

    @contextlib.contextmanager
    def static_batch(self, pos: torch.Tensor, n_read: int):
        """A batch whose positions `pos` [T] live on the device and are not read back: what a
        CUDA graph captures and replays (core/cuda_graph.py). begin() then only does device work
        (slot bookkeeping by index), every group's attention reads its first min(n_read, capacity)
        slots (empty or later ones are masked by their positions), and n_past is the caller's to
        advance. Needs the Triton attention kernel (it masks by slot positions; no [T, S] mask)."""
        if not ops.supports_graph_capture(self.attn_kernel):
            raise LlmkitError(
                f"static (CUDA-graph) batches need the triton attention kernel (it masks by slot "
                f"position), not {self.attn_kernel}"
            )
        self._static = (pos, n_read)
        try:
            yield
        finally:
            self._static = None

    @contextlib.contextmanager
    def tree_batch(self, parents: list[int]):
        """A batch of draft-tree rows: row i's parent is row parents[i] (-1: the root, row 0; parents
        come before their children). Row i sits at position n_past + depth(i), in slot n_past + i,
        and sees the cached positions plus its own ancestors: siblings (alternative drafts for the
        same position) do not see each other. After the batch, `commit_path` keeps one root-to-node
        path at consecutive positions. Needs the torch attention path (the Triton kernel masks by
        slot position, which siblings share)."""
        if not ops.supports_tree_masks(self.attn_kernel):
            raise LlmkitError(
                f"draft-tree batches need the torch attention path, not {self.attn_kernel}"
            )
        T = len(parents)
        if T == 0 or parents[0] != -1 or any(not 0 <= q < i for i, q in enumerate(parents) if i):
            raise LlmkitError(f"not a draft tree (parents before children): {parents}")
        depth = [0] * T
        anc = torch.eye(T, dtype=torch.bool)  # anc[i, j]: row j is row i or one of its ancestors
        for i in range(1, T):
            depth[i] = depth[parents[i]] + 1
            anc[i] |= anc[parents[i]]
        self._tree = (torch.tensor(depth, device=self.device), anc.to(self.device))
        try:
            yield
        finally:
            self._tree = None

    def commit_path(self, p0: int, path: list[int]) -> None:
        """After a tree batch begun at position p0: keep rows `path` (row 0 first, then one child
        per level) at positions p0, p0 + 1, ..., moving their K/V into those slots; forget the rest."""
        for g in self.groups.values():
            cap = self.n_ctx if g.window is None else g.capacity  # slot = position mod cap
            for j, r in enumerate(path):  # r >= j: a destination is never a later source
                if r != j:
                    for il in g.layers:
                        g.k[il][:, (p0 + j) % cap] = g.k[il][:, (p0 + r) % cap]
                        g.v[il][:, (p0 + j) % cap] = g.v[il][:, (p0 + r) % cap]
            g.slot_pos[torch.arange(p0, self.n_past, device=self.device) % cap] = -1
            keep = torch.arange(p0, p0 + len(path), device=self.device)
            g.slot_pos[keep % cap] = keep
        self.n_past = p0 + len(path)

    def _begin_static(self, pos: torch.Tensor, n_read: int) -> None:
        self._pos = pos
        self._high = self.n_ctx - 1  # positions stay on the device: assume the highest one
        for g in self.groups.values():
            g.slots = pos if g.window is None else pos % g.capacity
            g.slot_pos[g.slots] = pos
            g.n_read = min(n_read, g.capacity)
            g.mask = None

    def attention(self, q, K, V, mask, scale: float) -> torch.Tensor:
        """Attention over what update() returned (the kernel table's choice for this cache)."""
        if self.attn_kernel == "triton":
            g = self._group  # update() for this layer ran just before
            kpos = g.slot_pos[: g.n_read]
            # ggml block types are named to the kernel (it dequantizes them); float types are not
            kt, vt = (
                t if isinstance(KV_TYPES[t], QT) else None for t in (self.type_k, self.type_v)
            )
            return ops.attention_triton(q, K, V, kpos, self._pos, scale, g.window, kt, vt)
        return turbo.attention(q, K, V, mask, scale, self.type_k, self.type_v)  # = SDPA if no turbo

    def attend(self, il: int, q, k, v, scale: float) -> torch.Tensor:
        """Write this batch's k/v for layer il and attend q over the layer's cache: the one call a
        model block makes (q [T, Hq, D], k/v [T, Hkv, D]) -> [T, Hq * Dv]."""
        if self.attn_kernel != "native":
            return self.attention(q, *self.update(il, k, v), scale)
        g = self.group_of[il]
        return self._layer_step(il)(q, k, v, g.slots, g.n_read, g.slot_pos, self._pos, scale,
                                    g.window, g.mask)  # fmt: skip

    def native_step(self, il: int) -> tuple | None:
        """What a whole-block native call needs of layer il this step (kernels/cpu_block.py):
        (the layer's bound K/V buffers, slots written, slots read, their positions, the rows'
        positions, window, mask bytes or None); None off the native attention path."""
        if self.attn_kernel != "native":
            return None
        g = self.group_of[il]
        mask = ops.mask_bytes(g.mask) if g.mask is not None else None
        return (self._layer_step(il).kv_ref, g.slots, g.n_read, g.slot_pos, self._pos, g.window,
                mask)  # fmt: skip

    def native_stack(self, layers: tuple[int, ...]) -> tuple | None:
        """What one native call over the blocks of `layers` needs of this step
        (kernels/cpu_block.StackSite): (each layer's bound K/V buffers, its group's index, the
        groups' step arguments: slots, positions, slots read, window, mask); None off the native
        attention path or for a layer this cache does not hold."""
        if self.attn_kernel != "native":
            return None
        st = self._stacks.get(layers)
        if st is None:
            if any(il not in self.group_of for il in layers):
                return None
            names = list(self.groups)
            kvs = (ctypes.c_void_p * len(layers))(
                *(ctypes.addressof(self._layer_step(il).kv) for il in layers)
            )
            gidx = (ctypes.c_int32 * len(layers))(
                *(names.index(self.group_of[il].name) for il in layers)
            )
            st = self._stacks[layers] = (kvs, gidx, (ops.StepGroup * len(names))(), names)
        kvs, gidx, groups, names = st
        self._stack_masks = []  # the mask bytes the call reads, alive until the next step
        for sg, name in zip(groups, names):
            g = self.groups[name]
            sg.slots, sg.kpos, sg.qpos = (
                g.slots.data_ptr(),
                g.slot_pos.data_ptr(),
                self._pos.data_ptr(),
            )
            sg.n_read, sg.window = g.n_read, g.window or 0
            mask = ops.mask_bytes(g.mask) if g.mask is not None else None
            sg.mask = mask.data_ptr() if mask is not None else None
            self._stack_masks.append(mask)
        return kvs, gidx, groups

    def _layer_step(self, il: int):
        """Layer il's native write + attend, bound to its buffers once."""
        step = self._native.get(il)
        if step is None:
            g = self.group_of[il]
            kt, vt = KV_TYPES[self.type_k], KV_TYPES[self.type_v]
            step = self._native[il] = ops.layer_attention(g.k[il], kt, g.v[il], vt, self._dv[il])
        return step

    def begin(self, pos: torch.Tensor) -> None:
        """Reserve slots for a batch at positions `pos` [T] (contiguous, starting at n_past; in a
        tree batch, n_past + each row's depth) and build each group's attention mask [T, S]. Row i
        takes slot n_past + i (modulo a sliding ring's capacity)."""
        if self._static is not None:
            return self._begin_static(*self._static)
        T, p0 = pos.numel(), self.n_past
        p1 = p0 + T
        if self._tree is None:
            slots = pos
            given = self._given[0] is pos and self._given[1] == p0  # positions() made it
            if not given and (int(pos[0]) != p0 or int(pos[-1]) + 1 != p1):
                raise LlmkitError(
                    f"KV cache expects positions {p0}.., got {int(pos[0])}..{int(pos[-1])}"
                )
        else:
            slots = self._span(p0, p1)
        if p1 > self.n_ctx:
            raise LlmkitError(f"context is full: {p1} tokens exceed the context size {self.n_ctx}")
        self._pos = pos
        self._high = max(self._high, p1 - 1)
        # the torch path attends over a [T, S] mask; the native and Triton kernels mask by slot
        # position themselves, except in a tree batch (siblings share a position)
        need_mask = self.attn_kernel == "torch" or self._tree is not None
        for g in self.groups.values():
            g.mask = None
            if g.window is None:
                g.slots = slots
                g.slot_pos[p0:p1] = pos
                g.n_read = p1
                if need_mask:
                    kp = g.slot_pos[:p1]
                    g.mask = (kp[None, :] <= pos[:, None]) & (kp[None, :] >= 0)
            else:
                # a ring smaller than the context wraps: the batch and the window before it must fit
                if g.capacity < self.n_ctx and T + g.window - 1 > g.capacity:
                    raise LlmkitError(
                        f"batch of {T} tokens does not fit the sliding-window ring "
                        f"({g.capacity} slots, window {g.window}); use smaller batches"
                    )
                s0 = p0 % g.capacity
                if s0 + T <= g.capacity:  # no wrap: slices, not index ops
                    g.slots = self._span(s0, s0 + T)
                    g.slot_pos[s0 : s0 + T] = pos
                else:
                    g.slots = slots % g.capacity
                    g.slot_pos[g.slots] = pos
                g.n_read = min(g.capacity, p1)  # before the ring wraps only slots < p1 were written
                if need_mask:
                    kp = g.slot_pos[: g.n_read]
                    dist = pos[:, None] - kp[None, :]
                    g.mask = (kp[None, :] >= 0) & (dist >= 0) & (dist < g.window)
            if self._tree is not None:  # tree rows see their ancestors and themselves only
                g.mask[:, g.slots] = self._tree[1]
        self.n_past = p1

    def update(self, il: int, k: torch.Tensor, v: torch.Tensor):
        """Write this batch's k/v [T, Hkv, D] for layer il; return (K [Hkv,S,D], V, mask [T,S])."""
        g = self._group = self.group_of[il]
        store(g.k[il], self.type_k, g.slots, k)
        store(g.v[il], self.type_v, g.slots, v)
        if self.attn_kernel == "triton":  # the kernel reads q8_0 / q4_0 blocks itself
            return g.k[il][:, : g.n_read], g.v[il][:, : g.n_read], g.mask
        return load(g.k[il], self.type_k, g.n_read), load(g.v[il], self.type_v, g.n_read), g.mask

    def truncate(self, p: int) -> None:
        """Forget positions >= p (rollback). Sliding rings must still hold the window before p."""
        n = self.n_past
        if p >= n:
            return
        if p < 0:
            raise LlmkitError(f"cannot truncate the KV cache to {p}")
        for g in self.groups.values():
            cap = g.capacity
            if self._tree is None and n - p <= cap:
                # positions p..n-1 sit in slots p..n-1 mod cap (none later exists): one or two
                # slices; the same slots as scanning slot_pos for positions >= p
                s0, s1 = p % cap, n % cap
                if s0 < s1:
                    g.slot_pos[s0:s1] = -1
                else:
                    g.slot_pos[s0:] = -1
                    g.slot_pos[:s1] = -1
            else:
                g.slot_pos[g.slot_pos >= p] = -1
            if g.window is not None and p > 0:
                need = min(p, g.window)
                if self._high >= p - need + cap:  # a slot of positions p - need.. may be reused
                    check_window_kept(g.name, g.window, g.slot_pos, p)
        self.n_past = p

    def clear(self) -> None:
        for g in self.groups.values():
            g.slot_pos.fill_(-1)
        self.n_past, self._high = 0, -1

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups.values())

    def plan(self) -> dict:
        """Memory report: per group (layer type) its layers, cells and bytes."""
        return {
            "layers": self.layers,
            "bytes": self.nbytes(),
            "type_k": self.type_k,
            "type_v": self.type_v,
            "groups": {
                g.name: {
                    "layers": g.layers,
                    "cells": g.capacity,
                    "window": g.window,
                    "bytes": g.nbytes(),
                    # K and V bytes per cached token of one layer (by its cache type)
                    "bytes_per_token_layer": {
                        "k": g.k[g.layers[0]][:, 0].numel() * g.k[g.layers[0]].element_size(),
                        "v": g.v[g.layers[0]][:, 0].numel() * g.v[g.layers[0]].element_size(),
                    },
                }
                for g in self.groups.values()
            },
        }
