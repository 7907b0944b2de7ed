"""Vectorized PyTorch dequantizers for GGUF tensor storage formats.

Every function here is bit-identical to ``gguf.quants.dequantize`` (gguf-py's numpy reference):
same fp16 -> fp32 scale conversion, same fp32 multiplications in the same order. The
reference never uses fused multiply-add, so neither do we (``a.mul_(b).sub_(c)`` rounds twice,
exactly like numpy's ``a * b - c``).

A row of a GGUF tensor is a run of fixed-size blocks. Layouts, per block (little-endian,
``f16`` = IEEE half scale, ``@n`` = byte offset, QK_K = 256):

    type     elems bytes  fields
    F32          1     4  f32 value
    F16          1     2  f16 value
    BF16         1     2  upper 16 bits of an f32
    Q4_0        32    18  d:f16 @0 | qs[16] @2                       x = d * (q - 8)
    Q4_1        32    20  d @0 | m:f16 @2 | qs[16] @4                x = d * q + m
    Q5_0        32    22  d @0 | qh:u32 @2 | qs[16] @6               x = d * (q - 16)
    Q5_1        32    24  d @0 | m @2 | qh:u32 @4 | qs[16] @8        x = d * q + m
    Q8_0        32    34  d @0 | qs:i8[32] @2                        x = q * d
    IQ4_NL      32    18  d @0 | qs[16] @2                           x = d * KVALUES[q]
    Q2_K       256    84  scales[16] @0 | qs[64] @16 | d @80 | dmin @82
    Q3_K       256   110  hmask[32] @0 | qs[64] @32 | scales[12] @96 | d @108
    Q4_K       256   144  d @0 | dmin @2 | scales[12] @4 | qs[128] @16
    Q5_K       256   176  d @0 | dmin @2 | scales[12] @4 | qh[32] @16 | qs[128] @48
    Q6_K       256   210  ql[128] @0 | qh[64] @128 | scales:i8[16] @192 | d @208
    IQ4_XS     256   136  d @0 | scales_h:u16 @2 | scales_l[4] @4 | qs[128] @8

In the 32-element types, element i < 16 is the low nibble of qs[i] and element 16 + i its high
nibble; a 5th bit, when present, is bit i of the little-endian u32 qh. The K-quants (QK_K = 256
"super-blocks") hold an fp16 super-scale d (and dmin) plus small per-sub-block integer scales;
their bit packing is described next to each decoder below.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError

# Blocks decoded per step: big enough to amortize Python overhead, small enough that the
# uint8/fp32 temporaries of one step stay in cache and never grow with the tensor.
_CHUNK_ELEMS = 1 << 20

# IQ4_NL / IQ4_XS non-linear 4-bit code book.
_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Storage dtypes that may be passed directly instead of raw bytes.
_FLOAT_STORAGE = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# field helpers; `b` is always a contiguous uint8 tensor [n_blocks, type_size] whose storage
# offset is 4-byte aligned, so whole-tensor dtype views are legal.


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 field at even byte offset `off`, as fp32 [n_blocks, 1]."""
    # View the whole block array as 16-bit words: slicing bytes first would break alignment.
    w = off // 2
    return b.view(torch.int16)[:, w : w + 1].view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] uint8 -> [..., 2, k]: all low nibbles, then all high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[..., k] -> [..., len(shifts), k]: the field at each shift of every element of x."""
    sh = torch.tensor(shifts, dtype=x.dtype, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> sh) & mask


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] uint8: bit i of the u32 at column i."""
    sh = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> sh) & 1).reshape(qh.shape[0], 32)


def _iq4_lookup(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8) -> fp32 code-book values, same shape."""
    kv = torch.tensor(_IQ4_KVALUES, dtype=torch.float32, device=q.device)
    return kv[q.to(torch.int32)]  # int32 index: a quarter of the int64 temporary


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte scales -> (scale, min), each [n, 8] uint8 with 6-bit values.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 hold the low nibbles of scales 4-7 (low) and mins 4-7 (high).
    """
    sc_lo, mn_lo, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # [n, 4] each
    sc = torch.cat((sc_lo & 0x3F, (hi & 0x0F) | ((sc_lo >> 2) & 0x30)), dim=1)
    mn = torch.cat((mn_lo & 0x3F, (hi >> 4) | ((mn_lo >> 2) & 0x30)), dim=1)
    return sc, mn


# ---------------------------------------------------------------------------------------------
# one decoder per type: uint8 [n, type_size] -> fp32 [n, block_size]


def _dq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)  # [n, 1]


def _dq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).to(torch.float32)  # [n, 1]


def _dq_bf16(b: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an f32: shifting the bits is exact, NaN payloads included.
    return (b.view(torch.int16).to(torch.int32) << 16).view(torch.float32)  # [n, 1]


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)  # [n, 1]
    q = _nibbles(b[:, 2:]).reshape(-1, 32)  # [n, 32] uint8 0..15
    return (q.to(torch.int8) - 8).to(torch.float32).mul_(d)


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)  # [n, 1]
    q = _nibbles(b[:, 4:]).reshape(-1, 32)  # [n, 32]
    return q.to(torch.float32).mul_(d).add_(m)


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)  # [n, 1]
    q = _nibbles(b[:, 6:]).reshape(-1, 32) | (_qh_bits(b[:, 2:6]) << 4)  # [n, 32] 0..31
    return (q.to(torch.int8) - 16).to(torch.float32).mul_(d)


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)  # [n, 1]
    q = _nibbles(b[:, 8:]).reshape(-1, 32) | (_qh_bits(b[:, 4:8]) << 4)  # [n, 32] 0..31
    return q.to(torch.float32).mul_(d).add_(m)


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)  # [n, 1]
    return b[:, 2:].view(torch.int8).to(torch.float32).mul_(d)  # [n, 32]


def _dq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)  # [n, 1]
    return _iq4_lookup(_nibbles(b[:, 2:]).reshape(-1, 32)).mul_(d)  # [n, 32]


def _dq_q2_k(b: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16; scales[j] = min-scale (high nibble) | scale (low nibble).

    Each of the two 32-byte halves of qs holds 4 groups of 32 two-bit codes, at shifts 0,2,4,6.
    """
    n = b.shape[0]
    sc = b[:, 0:16]  # [n, 16]
    d, dmin = _f16(b, 80), _f16(b, 82)  # [n, 1]
    dl = (d * (sc & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (sc >> 4).to(torch.float32)).view(n, 16, 1)
    q = _bits(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3)  # [n, 2, 4, 32]
    q = q.reshape(n, 16, 16).to(torch.float32)
    return q.mul_(dl).sub_(ml).view(n, 256)


def _dq_q3_k(b: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16 with signed 6-bit scales (stored + 32).

    Scale j: low 4 bits from byte j % 8 of scales[0:8] (low nibble for j < 8, else high),
    top 2 bits from byte j % 4 of scales[8:12] at shift 2 * (j // 4).
    A value is its 2-bit code from qs minus 4 where its hmask bit is *clear*.
    """
    n = b.shape[0]
    d = _f16(b, 108)  # [n, 1]
    lo, hi = b[:, 96:104], b[:, 104:108]  # [n, 8], [n, 4]
    sc_lo = torch.cat((lo & 0x0F, lo >> 4), dim=1)  # [n, 16]
    sc_hi = _bits(hi, (0, 2, 4, 6), 3).reshape(n, 16)  # [n, 16]
    sc = ((sc_lo | (sc_hi << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).view(n, 16, 1)
    ql = _bits(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3)  # [n, 2, 4, 32]
    qh = _bits(b[:, 0:32].reshape(n, 1, 32), tuple(range(8)), 1)  # [n, 1, 8, 32]
    q = ql.reshape(n, 16, 16).to(torch.int8) - ((qh.reshape(n, 16, 16) ^ 1) << 2).to(torch.int8)
    return q.to(torch.float32).mul_(dl).view(n, 256)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks of 32, each with a 6-bit scale and min; x = d*sc * q - dmin*mn.

    Each 32-byte quarter of qs holds two sub-blocks: low nibbles, then high nibbles.
    """
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)  # [n, 1]
    sc, mn = _k_scale_min(b[:, 4:16])  # [n, 8]
    dl = (d * sc.to(torch.float32)).view(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return q.mul_(dl).sub_(ml).view(n, 256)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K plus a 5th bit: bit s of qh[i] belongs to element i of sub-block s."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)  # [n, 1]
    sc, mn = _k_scale_min(b[:, 4:16])  # [n, 8]
    dl = (d * sc.to(torch.float32)).view(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    ql = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], tuple(range(8)), 1)  # [n, 8, 32]
    q = (ql | (qh << 4)).to(torch.float32)
    return q.mul_(dl).sub_(ml).view(n, 256)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16 with int8 scales; 6-bit codes stored - 32.

    Per 128-element half: ql (64 bytes) gives the low nibbles of groups 0-1 then their high
    nibbles as groups 2-3; qh (32 bytes) gives the top 2 bits of groups 0-3 at shifts 0,2,4,6.
    """
    n = b.shape[0]
    d = _f16(b, 208)  # [n, 1]
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)  # [n, 16]
    dl = (d * sc).view(n, 16, 1)
    ql = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return q.view(n, 16, 16).to(torch.float32).mul_(dl).view(n, 256)


def _dq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks of 32 with signed 6-bit scales (stored + 32) and IQ4_NL codes.

    Scale j: low 4 bits are nibble j % 2 of scales_l[j // 2], top 2 bits are bits 2j, 2j+1 of
    the u16 scales_h. Each 16-byte slice of qs is one sub-block (low nibbles, then high).
    """
    n = b.shape[0]
    d = _f16(b, 0)  # [n, 1]
    # Arithmetic shift of the signed word is fine: the mask drops the sign-extended bits.
    sh = b.view(torch.int16)[:, 1:2]  # [n, 1]
    sc_hi = ((sh >> torch.arange(0, 16, 2, dtype=torch.int16, device=b.device)) & 3).to(
        torch.uint8
    )  # [n, 8]
    lo = b[:, 4:8]  # [n, 4]
    sc_lo = torch.stack((lo & 0x0F, lo >> 4), dim=-1).reshape(n, 8)  # interleaved nibbles
    sc = ((sc_lo | (sc_hi << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).view(n, 8, 1)
    q = _nibbles(b[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32)
    return _iq4_lookup(q).mul_(dl).view(n, 256)


_DEQUANT = {
    QT.F32: _dq_f32,
    QT.F16: _dq_f16,
    QT.BF16: _dq_bf16,
    QT.Q4_0: _dq_q4_0,
    QT.Q4_1: _dq_q4_1,
    QT.Q5_0: _dq_q5_0,
    QT.Q5_1: _dq_q5_1,
    QT.Q8_0: _dq_q8_0,
    QT.Q2_K: _dq_q2_k,
    QT.Q3_K: _dq_q3_k,
    QT.Q4_K: _dq_q4_k,
    QT.Q5_K: _dq_q5_k,
    QT.Q6_K: _dq_q6_k,
    QT.IQ4_NL: _dq_iq4_nl,
    QT.IQ4_XS: _dq_iq4_xs,
}

SUPPORTED_TYPES: frozenset[QT] = frozenset(_DEQUANT)


# ---------------------------------------------------------------------------------------------
# public API


def _sizes(qtype: QT) -> tuple[int, int]:
    """(block_size, type_size); row arithmetic works for every known type, supported or not."""
    try:
        return GGML_QUANT_SIZES[QT(qtype)]
    except (ValueError, KeyError):
        raise LlmkitError(f"unknown tensor type {qtype!r}") from None


def row_elems(qtype: QT, row_bytes: int) -> int:
    """Number of elements in a row of `row_bytes` bytes."""
    block_size, type_size = _sizes(qtype)
    if row_bytes % type_size:
        raise LlmkitError(
            f"{QT(qtype).name} row of {row_bytes} bytes is not a whole number of "
            f"{type_size}-byte blocks"
        )
    return row_bytes // type_size * block_size


def row_bytes(qtype: QT, n_elems: int) -> int:
    """Number of bytes of a row of `n_elems` elements."""
    block_size, type_size = _sizes(qtype)
    if n_elems % block_size:
        raise LlmkitError(
            f"{QT(qtype).name} row of {n_elems} elements is not a multiple of the block size "
            f"{block_size}"
        )
    return n_elems // block_size * type_size


def dequantize(
    raw: torch.Tensor,
    qtype: QT,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode GGUF rows to floats.

    raw: uint8 [..., row_bytes], the stored bytes of one or more rows (e.g. ``raw[token_ids]``
    for an embedding lookup). For F32/F16/BF16 it may instead be the float tensor of that dtype.
    Returns [..., row_elems] (or `shape`) in `dtype`; the arithmetic is fp32, cast at the end.
    The result may share memory with `raw` (F32 in, fp32 out).
    """
    block_size, type_size = _sizes(qtype)
    qtype = QT(qtype)
    fn = _DEQUANT.get(qtype)
    if fn is None:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise LlmkitError(f"unsupported tensor type {qtype.name} (supported: {names})")

    if raw.dtype == _FLOAT_STORAGE.get(qtype):
        raw = raw.reshape(raw.shape or (1,)).contiguous().view(torch.uint8)  # last dim x2 or x4
    elif raw.dtype == torch.int8:
        raw = raw.view(torch.uint8)
    elif raw.dtype != torch.uint8:
        raise LlmkitError(f"{qtype.name} tensor data must be uint8 bytes, got {raw.dtype}")
    if raw.dim() == 0 or raw.shape[-1] % type_size:
        raise LlmkitError(
            f"{qtype.name} data of shape {tuple(raw.shape)} is not rows of whole "
            f"{type_size}-byte blocks"
        )

    out_shape = (*raw.shape[:-1], raw.shape[-1] // type_size * block_size)
    if shape is not None:
        shape = tuple(shape)
        if torch.Size(shape).numel() != torch.Size(out_shape).numel():
            raise LlmkitError(
                f"cannot dequantize {qtype.name} data of {torch.Size(out_shape).numel()} "
                f"elements to shape {shape}"
            )
        out_shape = shape

    n_blocks = raw.numel() // type_size
    blocks = raw.reshape(n_blocks, type_size)  # [n_blocks, type_size]
    # Dtype views need a contiguous, word-aligned base (a row slice of a mmap may be neither).
    if not blocks.is_contiguous() or blocks.storage_offset() % 4:
        blocks = blocks.clone(memory_format=torch.contiguous_format)

    step = max(1, _CHUNK_ELEMS // block_size)
    if n_blocks <= step:
        return fn(blocks).reshape(out_shape).to(dtype)
    out = torch.empty((n_blocks, block_size), dtype=dtype, device=raw.device)
    for start in range(0, n_blocks, step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out.view(out_shape)
