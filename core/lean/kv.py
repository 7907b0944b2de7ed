"""The torch-free runtime's KV cache: per-layer K/V buffers on anonymous pages (pages.zero_array:
resident only where written), laid out as core/cache/kv.py's [n_head_kv, capacity, row] with the
same slot rule, so the native attention reads them the same way and rows get the same bits.

Layers are grouped by slot geometry: a *full* group has one slot per position of the context; a
*sliding* group (window W) a ring of W + margin slots, slot = position mod capacity. Every group
remembers which position each slot holds (-1: empty); the native attention masks by those
positions. Batches are consecutive positions from n_past (prompt chunks, decode steps); a
rollback (`truncate`) forgets positions, and fails where a ring already overwrote what the window
before the new end needs.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.core.cache.layout import LayerKV, check_window_kept
from llmkit.errors import LlmkitError
from llmkit.kernels import native_abi as abi
from llmkit.pages import zero_array

# cache type -> (native element code, bytes of a row of d values)
KV_TYPES = {
    "f16": (1, lambda d: 2 * d),
    "f32": (0, lambda d: 4 * d),
    "bf16": (30, lambda d: 2 * d),
    "q8_0": (8, lambda d: d // 32 * GGML_QUANT_SIZES[QT.Q8_0][1]),
    "q4_0": (2, lambda d: d // 32 * GGML_QUANT_SIZES[QT.Q4_0][1]),
}


class _Group:
    def __init__(self, name: str, window: int | None, capacity: int):
        self.name, self.window, self.capacity = name, window, capacity
        self.layers: list[int] = []
        self.slot_pos = np.full(capacity, -1, dtype=np.int64)
        self.slots = self.slot_pos[:0]  # this batch's slots (a view or a fresh index array)
        self.n_read = 0


class LeanKV:
    """KV buffers for `layers` (il -> LayerKV) and a context of n_ctx tokens; `margin`: the
    largest batch a sliding ring must take on top of its window."""

    def __init__(self, layers: dict[int, LayerKV], n_ctx: int, margin: int = 512,
                 type_k: str = "f16", type_v: str = "f16"):  # fmt: skip
        for name, t in (("K", type_k), ("V", type_v)):
            if t not in KV_TYPES:
                raise LlmkitError(f"unsupported {name} cache type {t} for the native CPU path")
        if n_ctx < 1:
            raise LlmkitError(f"context size must be at least 1, got {n_ctx}")
        self.n_ctx, self.margin, self.type_k, self.type_v = n_ctx, margin, type_k, type_v
        self.attn_kernel = "native"
        self.groups: dict[str, _Group] = {}
        self.group_of: dict[int, _Group] = {}
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.kv: dict[int, abi.KVLayer] = {}
        (kc, k_row), (vc, v_row) = KV_TYPES[type_k], KV_TYPES[type_v]
        for il, s in sorted(layers.items()):
            for t, d in ((type_k, s.head_dim_k), (type_v, s.head_dim_v)):
                if t.startswith("q") and d % 32:
                    raise LlmkitError(
                        f"{t} KV cache needs a head dimension that is a multiple of 32 (got {d})"
                    )
            name = "full" if s.window is None else f"swa{s.window}"
            cap = n_ctx if s.window is None else min(n_ctx, s.window + margin)
            g = self.groups.setdefault(name, _Group(name, s.window, cap))
            g.layers.append(il)
            self.group_of[il] = g
            k = zero_array((s.n_head_kv, cap, k_row(s.head_dim_k)), np.uint8)
            v = zero_array((s.n_head_kv, cap, v_row(s.head_dim_v)), np.uint8)
            self.buffers[il] = (k, v)
            self.kv[il] = abi.KVLayer(k.ctypes.data, k.strides[0], k.strides[1], v.ctypes.data,
                                      v.strides[0], v.strides[1], s.head_dim_v, s.n_head_kv, kc,
                                      vc)  # fmt: skip
        self._arange = np.arange(n_ctx, dtype=np.int64)  # positions and slots as views
        self.pos = self._arange[:0]
        self.n_past = 0
        self._stacks: dict = {}

    @property
    def layers(self) -> list[int]:
        return sorted(self.group_of)

    def begin(self, n: int) -> np.ndarray:
        """Reserve slots for the next n positions (n_past ..): row i takes slot n_past + i
        (modulo a ring's capacity). Returns the batch's positions."""
        p0, p1 = self.n_past, self.n_past + n
        if p1 > self.n_ctx:
            raise LlmkitError(f"context is full: {p1} tokens exceed the context size {self.n_ctx}")
        pos = self.pos = self._arange[p0:p1]
        for g in self.groups.values():
            if g.window is None:
                g.slots = pos
                g.slot_pos[p0:p1] = pos
                g.n_read = p1
                continue
            if g.capacity < self.n_ctx and n + g.window - 1 > g.capacity:
                raise LlmkitError(
                    f"batch of {n} tokens does not fit the sliding-window ring "
                    f"({g.capacity} slots, window {g.window}); use smaller batches"
                )
            s0 = p0 % g.capacity
            g.slots = self._arange[s0 : s0 + n] if s0 + n <= g.capacity else pos % g.capacity
            g.slot_pos[g.slots] = pos
            g.n_read = min(g.capacity, p1)  # before the ring wraps only slots < p1 were written
        self.n_past = p1
        return pos

    def native_stack(self, layers: tuple[int, ...]) -> tuple:
        """(each layer's llk_kv_layer pointer, its group's index, the groups' llk_step_group
        array filled for the current batch) for llk_stack_run over `layers`."""
        st = self._stacks.get(layers)
        if st is None:
            names = list(self.groups)
            kvs = (ctypes.c_void_p * len(layers))(*(ctypes.addressof(self.kv[i]) for i in layers))
            gidx = (ctypes.c_int32 * len(layers))(
                *(names.index(self.group_of[il].name) for il in layers)
            )
            st = self._stacks[layers] = (kvs, gidx, (abi.StepGroup * len(names))(), names)
        kvs, gidx, groups, names = st
        for sg, name in zip(groups, names):
            g = self.groups[name]
            sg.slots, sg.kpos, sg.qpos = (
                g.slots.ctypes.data,
                g.slot_pos.ctypes.data,
                self.pos.ctypes.data,
            )
            sg.n_read, sg.window, sg.mask = g.n_read, g.window or 0, None
        return kvs, gidx, groups

    def truncate(self, p: int) -> None:
        """Forget positions >= p (rollback); a ring must still hold the window before p."""
        if p >= self.n_past:
            return
        if p < 0:
            raise LlmkitError(f"cannot truncate the KV cache to {p}")
        for g in self.groups.values():
            g.slot_pos[g.slot_pos >= p] = -1
            if g.window is not None and p > 0:
                check_window_kept(g.name, g.window, g.slot_pos, p)
        self.n_past = p

    def clear(self) -> None:
        for g in self.groups.values():
            g.slot_pos.fill(-1)
        self.n_past = 0

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.buffers.values())

    def plan(self) -> dict:
        """Memory report: per group (layer type) its layers, cells and bytes."""
        groups = {}
        for g in self.groups.values():
            k, v = self.buffers[g.layers[0]]
            groups[g.name] = {
                "layers": g.layers,
                "cells": g.capacity,
                "window": g.window,
                "bytes": sum(sum(b.nbytes for b in self.buffers[il]) for il in g.layers),
                "bytes_per_token_layer": {
                    "k": k.shape[0] * k.shape[2],
                    "v": v.shape[0] * v.shape[2],
                },
            }
        return {
            "layers": self.layers,
            "bytes": self.nbytes(),
            "type_k": self.type_k,
            "type_v": self.type_v,
            "groups": groups,
        }
