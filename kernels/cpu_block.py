"""A whole pre-norm decoder block in one native call (kernels/native/block.c): the q|k|v
projection with its input norm, RoPE (per-head norms and the query scale fused), the KV write
and attention, the output projection, the FFN with its GLU, post-norms and residuals.

It runs the same native calls a block makes one by one (cpu_native.NativeLinear sites,
cpu_ops.RopeSite, cpu_ops.LayerAttention) on the same buffers in the same order, so a row's
result is bit for bit the same; what it saves is the interpreter between them (a decode step
makes one call per layer instead of six). Bytes and flops: the four linears' and attention's.

    site = BlockSite(m, (wqkv, wo, w_gate_up, w_down), norms, eps, "silu", BlockShape(...))
    y = site(x, cos, sin, *cache.native_step(il))   # x, y fp32 [m, n_embd]
    y = StackSite(sites, rope_index)(x, tables, *cache.native_stack(layers))   # every block
"""

from __future__ import annotations

import ctypes

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import native_abi as abi
from llmkit.kernels import native_bind
from llmkit.kernels.native_abi import NextN
from llmkit.kernels.native_bind import BlockShape

__all__ = ["BlockShape", "BlockSite", "NextNSite", "StackSite"]

_vp, _i32 = ctypes.c_void_p, ctypes.c_int32

# looked up per call (a module global: scripts/profile_cpu_decode.py times it by replacing it)
_RUN = abi.LIB.llk_block_run if abi.LIB is not None else None


class BlockSite:
    """One block bound to its weights and to buffers for steps of up to `m` rows: a callable
    (x, cos, sin, kv_layer, slots, n_read, kpos, qpos, window, mask) -> y. Not thread-safe
    (its buffers): one per thread, e.g. in common.row_scratch's per-thread step state."""

    def __init__(self, m: int, linears: tuple, norms: tuple, eps: float, glu: str, s: BlockShape):
        """linears: NativeLinear q|k|v, output, gate|up, down; norms: (attn_norm, post_attn_norm
        or None, ffn_norm, post_ffn_norm or None), fp32 [n_embd] each."""
        wqkv, wgu = linears[0], linears[2]
        n_embd = wqkv.in_features
        f32 = torch.float32
        self.buffers = (
            torch.empty(m, wqkv.out_features, dtype=f32), torch.empty(m, s.hq * s.dv, dtype=f32),
            torch.empty(m, n_embd, dtype=f32), torch.empty(m, wgu.out_features, dtype=f32),
        )  # fmt: skip
        b, fuses = native_bind.block_struct(
            m, tuple(lin.bound for lin in linears), norms, eps, glu, s,
            tuple(t.data_ptr() for t in self.buffers), lambda t: t.data_ptr(),
        )  # fmt: skip
        # everything the struct points into stays alive with it
        self._keep = (linears, fuses, norms, s)
        self._b, self._ref, self.n_embd = b, ctypes.byref(b), n_embd

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv, slots,
                 n_read: int, kpos, qpos, window, mask) -> torch.Tensor:  # fmt: skip
        """x: contiguous fp32 [M, n_embd] (the caller's to guarantee); cos/sin fp32 [M, n_rot/2];
        kv: a KVLayer (byref); slots, kpos, qpos int64; mask: uint8 [M, n_read] or None."""
        m = x.shape[0]
        y = torch.empty(m, self.n_embd, dtype=torch.float32)
        rc = _RUN(
            self._ref, m, x.data_ptr(), y.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv,
            slots.data_ptr(), n_read, kpos.data_ptr(), qpos.data_ptr(), window or 0,
            mask.data_ptr() if mask is not None else None,
        )  # fmt: skip
        if rc:
            raise LlmkitError(f"native block failed: {abi.ERRORS.get(rc, rc)}")
        return y


_STACK = abi.LIB.llk_stack_run if abi.LIB is not None else None


class StackSite:
    """Blocks run one after the other in one native call (llk_stack_run): each block's BlockSite
    (all bound for the same m rows) and the index of its RoPE table among a step's tables. A
    callable (x, tables [(cos, sin)], kv_layers, group_of_layer, groups) -> y, the arguments
    after the tables coming from the cache (KVCache.native_stack). Not thread-safe."""

    def __init__(self, sites: list[BlockSite], rope_index: list[int]):
        n, self.m, self.n_embd = len(sites), sites[0]._b.m, sites[0].n_embd
        if any(s._b.m != self.m or s.n_embd != self.n_embd for s in sites):
            raise LlmkitError("StackSite: the blocks must share their rows and width")
        self.n = n
        self._blocks = (_vp * n)(*(ctypes.addressof(s._b) for s in sites))
        self._rope = (_i32 * n)(*rope_index)
        n_tables = max(rope_index) + 1
        self._cos, self._sin = (_vp * n_tables)(), (_vp * n_tables)()
        self._tmp = torch.empty(2, self.m, self.n_embd, dtype=torch.float32)
        self._keep = sites  # the structs the pointers point to

    def __call__(self, x: torch.Tensor, tables: list, kvs, group_of_layer, groups) -> torch.Tensor:
        """x: contiguous fp32 [M, n_embd]; tables: contiguous fp32 (cos, sin) per RoPE table."""
        for i, (c, s) in enumerate(tables):
            self._cos[i], self._sin[i] = c.data_ptr(), s.data_ptr()
        m = x.shape[0]
        y = torch.empty(m, self.n_embd, dtype=torch.float32)
        rc = _STACK(
            self._blocks, kvs, group_of_layer, self._rope, self.n, m, x.data_ptr(), y.data_ptr(),
            self._tmp.data_ptr(), self._cos, self._sin, groups,
        )  # fmt: skip
        if rc:
            raise LlmkitError(f"native block stack failed: {abi.ERRORS.get(rc, rc)}")
        return y


_NEXTN = abi.LIB.llk_nextn_run if abi.LIB is not None else None


class NextNSite:
    """A NextN head's draft step in one native call (llk_nextn_run): the embedding lookup
    (cpu_ops.EmbedRows), x0 = eh_proj [rms(e) * enorm | rms(h_prev) * hnorm], the head's block
    (its BlockSite, bound for up to m rows) and the draft head with its input norm on the rows
    that draft: the calls core/models/nextn.py makes one by one, on buffers of the same values,
    so the same bits. A callable (tokens, h_prev, z_rows, cos, sin, kv, slots, n_read, kpos,
    qpos, window, mask) -> (y [T, n_embd], z [len(z_rows), head rows]). Not thread-safe."""

    def __init__(self, block: BlockSite, embed, norms: tuple, eps: float, eh_proj, head,
                 head_norm: torch.Tensor):  # fmt: skip
        """embed: a cpu_ops.EmbedRows; norms: (enorm, hnorm) fp32 [n_embd]; eh_proj, head:
        NativeLinear [2 n_embd -> n_embd] and [n_embd -> head rows]."""
        e, m = block.n_embd, block._b.m
        if eh_proj.in_features != 2 * e or eh_proj.out_features != e or head.in_features != e:
            raise LlmkitError("NextNSite: eh_proj / head shapes do not fit the block")
        if embed.k != e:
            raise LlmkitError("NextNSite: the embedding width is not the block's")
        f32 = torch.float32
        self.buffers = tuple(torch.empty(m, w, dtype=f32) for w in (e, 2 * e, e, e))
        fuse = head._fuse((head_norm, eps), None, None)  # (llk_fuse, byref, norms)
        n = NextN()
        n.embd_type, n.embd, n.embd_rows, n.embd_row_bytes, _ = embed.bound
        n.embd_scale, n.eps = embed.scale, eps
        n.enorm, n.hnorm = (t.data_ptr() for t in norms)
        n.eh_parts, n.eh_n_parts = ctypes.cast(eh_proj._parts, _vp), eh_proj._n_parts
        n.block = ctypes.addressof(block._b)
        n.head_parts, n.head_n_parts = ctypes.cast(head._parts, _vp), head._n_parts
        n.head_fuse = fuse[0]
        n.e, n.cat, n.x0, n.zin = (t.data_ptr() for t in self.buffers)
        self._keep = (block, embed, norms, eh_proj, head, fuse)  # what the struct points into
        self._ref, self.m, self.n_embd, self.n_head = ctypes.byref(n), m, e, head.out_features
        self._n = n

    def __call__(self, tokens: torch.Tensor, h_prev: torch.Tensor, z_rows: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, kv, slots, n_read: int, kpos, qpos, window,
                 mask) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """tokens, z_rows: contiguous int64; h_prev: contiguous fp32 [T, n_embd]; the rest as
        BlockSite's."""
        t, nz = tokens.numel(), z_rows.numel()
        y = torch.empty(t, self.n_embd, dtype=torch.float32)
        z = torch.empty(nz, self.n_head, dtype=torch.float32)
        rc = _NEXTN(
            self._ref, t, tokens.data_ptr(), h_prev.data_ptr(), y.data_ptr(), nz,
            z_rows.data_ptr(), z.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv, slots.data_ptr(),
            n_read, kpos.data_ptr(), qpos.data_ptr(), window or 0,
            mask.data_ptr() if mask is not None else None,
        )  # fmt: skip
        if rc == -2 and (int(tokens.min()) < 0 or int(tokens.max()) >= self._n.embd_rows):
            raise LlmkitError(
                f"token ids must lie in [0, {self._n.embd_rows}) for the embedding lookup"
            )
        if rc:
            raise LlmkitError(f"native NextN step failed: {abi.ERRORS.get(rc, rc)}")
        return y, z
