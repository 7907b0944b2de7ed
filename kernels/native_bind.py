"""Weights and blocks bound for the native library's calls, without torch: GGUF weight bytes
(numpy views of the file mapping) checked and described as llk_part descriptors, packed into
x8 groups where the ISA path reads them so (kernels/cpu_pack.py), and the llk_fuse / llk_block
structs a fused linear or a whole decoder block runs from.

Both CPU paths bind through here: cpu_native.NativeLinear and cpu_block.BlockSite (torch
tensors, whose memory they hand over as arrays or pointers) and the torch-free runtime
(core/lean/). Pointers into norms and buffers are plain integers: the caller keeps what they point
into alive. Bytes and flops: none at call time; packing moves each packed weight's bytes once.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_pack
from llmkit.kernels import native_abi as abi

_vp = ctypes.c_void_p


def weight_rows(w: np.ndarray, qtype: QT, k: int | None, name: str) -> np.ndarray:
    """w, uint8 [N, row_bytes] with contiguous rows whose rows hold k values each (checked)."""
    if w.dtype != np.uint8:
        raise LlmkitError(f"{name}: weight bytes must be uint8, got {w.dtype}")
    if w.ndim != 2 or w.strides[1] != 1:
        raise LlmkitError(
            f"{name}: weight bytes must be [N, row_bytes] with contiguous rows, "
            f"got shape {tuple(w.shape)} strides {w.strides}"
        )
    block = GGML_QUANT_SIZES[qtype][0]
    if k is not None and k % block:
        raise LlmkitError(
            f"{name}: {qtype.name} needs K to be a multiple of its {block}-value blocks, got K={k}"
        )
    kw = abi.elems_per_row(qtype, w.shape[1])
    if k is not None and kw != k:
        raise LlmkitError(
            f"{name}: {qtype.name} rows of {w.shape[1]} bytes hold {kw} values, not {k}"
        )
    return w


class BoundLinear:
    """One linear layer's weights, fused along N (q/k/v, gate/up), bound for native calls.

    parts: (bytes uint8 [N_i, row_bytes], qtype, (N_i, K)) each; the types may differ. `pack`:
    store the parts the ISA path reads in x8 groups that way; `release`: they view a read-only
    file mapping whose pages may be dropped once packed. The arrays are kept (no copies besides
    the packed ones): they must stay valid, e.g. the GGUF mmap."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, object, tuple[int, int]]],
                 release: bool = False, pack: bool = True):  # fmt: skip
        lib = abi.need()
        if not parts:
            raise LlmkitError("a native linear needs at least one weight")
        if len(parts) > 64:
            raise LlmkitError("a native linear fuses at most 64 weights")
        self.in_features = int(parts[0][2][1])
        self.weights: list[np.ndarray] = []
        self.packed: list[tuple[np.ndarray, np.ndarray]] = []  # (source rows, x8 groups)
        descs, col = [], 0
        for i, (w, qtype, shape) in enumerate(parts):
            qtype = abi.check_type(qtype)
            n, k = (int(s) for s in shape)
            if k != self.in_features:
                raise LlmkitError(f"part {i} has K={k}, part 0 has K={self.in_features}")
            w = weight_rows(w, qtype, k, f"part {i} ({qtype.name} {n}x{k})")
            if w.shape[0] != n:
                raise LlmkitError(f"part {i}: {w.shape[0]} rows of bytes for shape {(n, k)}")
            packed = cpu_pack.pack_x8(lib, w, qtype, release) if pack else None
            layout = cpu_pack.LAYOUT_ROWS if packed is None else cpu_pack.LAYOUT_X8
            if packed is not None:
                self.packed.append((w, packed))
                w = packed
            self.weights.append(w)
            descs.append((w.ctypes.data, w.strides[0], n, col, int(qtype), layout))
            col += n
        self.out_features = col
        self.qtypes = tuple(QT(p[1]) for p in parts)
        self.n_parts = len(descs)
        self.parts = (abi.Part * len(descs))(*descs)
        self.weight_bytes = sum(int(p[2][0]) * w.shape[1] for p, w in zip(parts, self.weights))

    def fuse(self, norm: tuple | None = None, glu: str | None = None,
             post_norm: tuple | None = None) -> abi.Fuse:  # fmt: skip
        """The llk_fuse of a call site: y = residual + post_norm(glu(norm(x)) @ W^T), `norm` and
        `post_norm` as (pointer to fp32 [n] weights, eps); the residual pointer is set per call."""
        return abi.Fuse(
            norm[0] if norm is not None else None,
            norm[1] if norm is not None else 0.0,
            abi.GLU_ACTS[glu] if glu else -1,
            post_norm[0] if post_norm is not None else None,
            post_norm[1] if post_norm is not None else 0.0,
            0,
            None,
            self.out_features,
        )


@dataclass(frozen=True)
class BlockShape:
    """A block's heads and its RoPE: hq query and hkv KV heads of dk (values dv); RoPE over the
    first n_rot dims (NEOX halves or NORM pairs), per-head norms (weight [dk], eps) or None, the
    query scale (Gemma's, folded into q) and the attention scale. The norm weights are fp32
    arrays or tensors, whichever the caller binds with (`ptr` below)."""

    hq: int
    hkv: int
    dk: int
    dv: int
    n_rot: int
    neox: bool
    q_norm: tuple | None = None
    k_norm: tuple | None = None
    q_scale: float = 1.0
    attn_scale: float = 1.0


def block_struct(m: int, linears: tuple, norms: tuple, eps: float, glu: str, s: BlockShape,
                 buffers: tuple[int, int, int, int], ptr) -> tuple[abi.Block, tuple]:  # fmt: skip
    """The llk_block of one pre-norm decoder block for steps of up to m rows, and the llk_fuse
    structs it copies (kept by the caller with it). linears: BoundLinear q|k|v, output,
    gate|up, down; norms: (attn_norm, post_attn_norm or None, ffn_norm, post_ffn_norm or None);
    buffers: pointers to fp32 [m, n_qkv], [m, hq * dv], [m, n_embd], [m, n_gu]; `ptr(a)` gives
    the address of a norm weight."""
    wqkv, wo, wgu, wdown = linears
    attn_norm, post_attn, ffn_norm, post_ffn = norms
    n_embd = wqkv.in_features
    if (
        wqkv.out_features != (s.hq + s.hkv) * s.dk + s.hkv * s.dv
        or wo.in_features != s.hq * s.dv
        or wo.out_features != n_embd
        or wgu.in_features != n_embd
        or wdown.in_features * 2 != wgu.out_features
        or wdown.out_features != n_embd
    ):
        raise LlmkitError("native block: the linears' shapes do not make one block")
    eps_qk = {n[1] for n in (s.q_norm, s.k_norm) if n is not None}
    if len(eps_qk) > 1:
        raise LlmkitError("native block: the q and k norms must share their eps")
    fuses = (
        wqkv.fuse((ptr(attn_norm), eps)),
        wo.fuse(post_norm=(ptr(post_attn), eps) if post_attn is not None else None),
        wgu.fuse((ptr(ffn_norm), eps)),
        wdown.fuse(glu=glu, post_norm=(ptr(post_ffn), eps) if post_ffn is not None else None),
    )
    b = abi.Block()
    for i, (lin, fu) in enumerate(zip(linears, fuses, strict=True)):
        b.parts[i] = ctypes.cast(lin.parts, _vp)
        b.n_parts[i] = lin.n_parts
        b.fuse[i] = fu
    b.n_embd, b.n_qkv, b.n_gu, b.m = n_embd, wqkv.out_features, wgu.out_features, m
    b.hq, b.hkv, b.dk, b.dv, b.n_rot, b.neox = s.hq, s.hkv, s.dk, s.dv, s.n_rot, int(s.neox)
    b.q_norm = ptr(s.q_norm[0]) if s.q_norm is not None else None
    b.k_norm = ptr(s.k_norm[0]) if s.k_norm is not None else None
    b.qk_eps, b.q_scale, b.attn_scale = eps_qk.pop() if eps_qk else 0.0, s.q_scale, s.attn_scale
    b.qkv, b.o, b.x1, b.h = buffers
    return b, fuses
