"""The torch-free forward pass: a model whose every block is the native whole-block call
(core/archs: llama, gemma3) run straight from the GGUF mapping with numpy buffers.

A forward is three native calls: the embedding rows (llk_embed_rows), every block in one
llk_stack_run (norms, q|k|v, RoPE, KV write, attention, output, GLU FFN, residuals), and the LM
head with the output norm fused (llk_linear). They are the calls the torch path's DecoderLM makes
for a step on the native CPU path, bound to the same bytes (kernels/native_bind.py), RoPE rows
from the same table function (kernels/rope_table.py) and KV buffers of the same layout
(core/lean/kv.py), so a row's logits are the same bits on both paths (tests/test_lean.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
from gguf.quants import dequantize

from llmkit.core.archs import arch_spec
from llmkit.core.lean.kv import LeanKV
from llmkit.core.model.protocol import ForwardOutput
from llmkit.errors import LlmkitError
from llmkit.kernels import native_abi as abi
from llmkit.kernels.native_bind import BoundLinear, block_struct
from llmkit.kernels.rope_table import rope_table, table_size

_vp, _i32 = ctypes.c_void_p, ctypes.c_int32


def _check(rc: int, what: str) -> None:
    if rc:
        raise LlmkitError(f"native {what} failed: {abi.ERRORS.get(rc, rc)}")


class LeanModel:
    """cfg's trunk over the GGUF `gf` (tensors checked already), bound for batches of up to
    `max_rows` rows (a prompt chunk); `repack`: x8 groups where the ISA path reads them."""

    def __init__(self, gf, arch: str, cfg, max_rows: int, repack: bool = True):
        abi.need()
        spec = arch_spec(arch)
        self.config, self.arch, self.m = cfg, arch, max(1, max_rows)
        self.packed: list = []  # (source rows, x8 groups) of every packed weight
        self.linear_bytes = 0  # weight bytes the matmuls read per token
        self._keep: list = []  # arrays the native structs point into

        def lin(*names: str) -> BoundLinear:
            parts = [(gf.raw(n), gf.tensors[n].qtype, gf.tensors[n].shape) for n in names]
            b = BoundLinear(parts, release=True, pack=repack)
            self.packed += b.packed
            self.linear_bytes += sum(gf.tensors[n].nbytes for n in names)
            return b

        def vec(name: str) -> np.ndarray:
            t = gf.tensors[name]
            return np.ascontiguousarray(dequantize(gf.raw(name), t.qtype), dtype=np.float32)

        plans = [spec.block_plan(cfg, il) for il in range(cfg.n_layer)]
        blocks, tables = [], {}  # rope key -> table index
        linears = [
            tuple(lin(*(f"blk.{il}.{n}.weight" for n in parts)) for parts in spec.LINEARS.values())
            for il in range(cfg.n_layer)
        ]
        widths = [(b[0].out_features, p.shape.hq * p.shape.dv, b[0].in_features, b[2].out_features)
                  for b, p in zip(linears, plans)]  # fmt: skip
        m = self.m
        self._buffers = [np.empty((m, max(w[i] for w in widths)), np.float32) for i in range(4)]
        bufs = tuple(b.ctypes.data for b in self._buffers)
        self._rope_index = []
        for il, (p, ls) in enumerate(zip(plans, linears)):
            norms = tuple(None if n is None else vec(f"blk.{il}.{n}.weight") for n in p.norms)
            qn, kn = (None if n is None else vec(f"blk.{il}.{n}.weight") for n in p.qk_norms)
            shape = replace(p.shape, q_norm=(qn, cfg.eps) if qn is not None else None,
                            k_norm=(kn, cfg.eps) if kn is not None else None)  # fmt: skip
            b, fuses = block_struct(m, ls, norms, cfg.eps, abi.native_glu(p.glu), shape, bufs,
                                    lambda a: a.ctypes.data)  # fmt: skip
            blocks.append(b)
            self._keep += [ls, fuses, norms, qn, kn]
            self._rope_index.append(tables.setdefault(p.rope, len(tables)))
        self._blocks = blocks
        self._block_ptrs = (_vp * len(blocks))(*(ctypes.addressof(b) for b in blocks))
        self._rope_idx = (_i32 * len(blocks))(*self._rope_index)
        self._ropes = list(tables)  # (n_rot, base, freq_scale, factors name or None)
        self._tables: list = [None] * len(tables)
        self._factors = {r[3]: vec(f"{r[3]}.weight") for r in self._ropes
                         if r[3] is not None and f"{r[3]}.weight" in gf.tensors}  # fmt: skip
        self._cos, self._sin = (_vp * len(tables))(), (_vp * len(tables))()
        self._tmp = np.empty((2, m, cfg.n_embd), np.float32)
        emb = gf.tensors["token_embd.weight"]
        self._embd = gf.raw("token_embd.weight")
        self._embd_args = (int(emb.qtype), self._embd.ctypes.data, emb.shape[0],
                           self._embd.strides[0], cfg.n_embd)  # fmt: skip
        self._embd_scale = spec.embed_scale(cfg)
        has_head = "output.weight" in gf.tensors
        self.output = lin("output.weight" if has_head else "token_embd.weight")
        self.output_norm = vec("output_norm.weight")
        self._head_fuse = self.output.fuse((self.output_norm.ctypes.data, cfg.eps))
        self.n_vocab = self.output.out_features
        self.mtp = None

    def kv_layout(self) -> dict:
        return {il: self.config.layer_kv(il) for il in range(self.config.n_layer)}

    def new_cache(self, n_ctx: int, margin: int, type_k: str, type_v: str) -> LeanKV:
        return LeanKV(self.kv_layout(), n_ctx, margin, type_k, type_v)

    def _table(self, i: int, n: int):
        """RoPE table i holding positions < n (grown by doubling, as the torch path's)."""
        t = self._tables[i]
        if t is None or t[0].shape[0] < n:
            n_rot, base, scale, factors = self._ropes[i]
            f = self._factors.get(factors)
            t = self._tables[i] = rope_table(table_size(n), n_rot, base, scale, f)
        return t

    def embed(self, ids: np.ndarray) -> np.ndarray:
        x = np.empty((ids.size, self.config.n_embd), np.float32)
        rc = abi.LIB.llk_embed_rows(*self._embd_args, ids.ctypes.data, ids.size,
                                    self._embd_scale, x.ctypes.data)  # fmt: skip
        if rc == -2:
            raise LlmkitError(
                f"token ids must lie in [0, {self._embd_args[2]}) for the embedding lookup"
            )
        _check(rc, "embedding lookup")
        return x

    def forward(self, tokens, cache: LeanKV, logits="last") -> ForwardOutput:
        """tokens (ids, at most max_rows) -> ForwardOutput(logits of the last row or of all rows, or
        None; the hidden state of every row)."""
        ids = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        t = ids.size
        if not 1 <= t <= self.m:
            raise LlmkitError(f"a batch of {t} tokens (this runtime takes 1 to {self.m})")
        x = self.embed(ids)
        pos = cache.begin(t)
        p0 = int(pos[0])
        for i in range(len(self._ropes)):
            cos, sin = self._table(i, cache.n_past)
            self._cos[i] = cos.ctypes.data + p0 * cos.strides[0]
            self._sin[i] = sin.ctypes.data + p0 * sin.strides[0]
        y = np.empty_like(x)
        kvs, gidx, groups = cache.native_stack(tuple(range(self.config.n_layer)))
        rc = abi.LIB.llk_stack_run(self._block_ptrs, kvs, gidx, self._rope_idx, len(self._blocks),
                                   t, x.ctypes.data, y.ctypes.data, self._tmp.ctypes.data,
                                   self._cos, self._sin, groups)  # fmt: skip
        _check(rc, "block stack")
        if logits is None:
            return ForwardOutput(None, y)
        if logits not in ("last", "all"):
            raise LlmkitError(f"logits must be 'last', 'all' or None, not {logits!r}")
        return ForwardOutput(self.lm_logits(y[-1:] if logits == "last" else y), y)

    def lm_logits(self, h: np.ndarray) -> np.ndarray:
        """Pre-norm hidden rows [n, H] -> logits [n, V] fp32 (output norm and LM head)."""
        h = np.ascontiguousarray(h, dtype=np.float32)
        n, e = h.shape
        z = np.empty((n, self.n_vocab), np.float32)
        out = self.output
        rc = abi.LIB.llk_linear(h.ctypes.data, n, e, e, ctypes.byref(self._head_fuse), out.parts,
                                out.n_parts, z.ctypes.data, self.n_vocab)  # fmt: skip
        _check(rc, "LM head")
        return z
