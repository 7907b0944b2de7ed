"""Triton quantized GEMV/small-GEMM reading GGUF blocks in place: y = x @ W^T.

x: [M, K] fp16/fp32/bf16, W: the raw GGUF bytes of N rows, uint8 [N, K / bs * ts], y: [M, N]
fp32. Each program owns BLOCK_N output rows and BLOCK_M input rows; it walks K in steps of G
blocks (G * bs elements), decodes those blocks of its W rows straight from the stored bytes into
fp32 registers (never a dequantized copy in memory) and accumulates x @ W^T in fp32.

Types: Q8_0, Q4_0, Q4_1, Q5_0 (bs = 32) and Q4_K, Q5_K, Q6_K, IQ4_XS (bs = 256); layouts as in
``llmkit.quant.dequant`` (its torch decoders are the bit-exact reference).

Per call: bytes = N * K / bs * ts (W, read once when M <= BLOCK_M)
                + M * K * x.element_size() * ceil(N / BLOCK_N) (x, from cache after the first)
                + 4 * M * N (y);
          flops = 2 * M * N * K.
The GEMV regime (M <= 16) is memory-bound on W: for Q4_K that is 0.5625 bytes per weight.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError

# QTYPE codes (constexpr) for the kernel's static dispatch.
_CODES = {
    QT.Q8_0: 0,
    QT.Q4_0: 1,
    QT.Q4_1: 2,
    QT.Q5_0: 3,
    QT.Q4_K: 4,
    QT.Q6_K: 5,
    QT.Q5_K: 6,
    QT.IQ4_XS: 7,
}
# IQ4_XS non-linear code book (the kernel looks codes up in this table, passed as a tensor)
_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
SUPPORTED_TYPES: frozenset[QT] = frozenset(_CODES)
# quants read as 32-bit words: the rows must start at multiples of these many bytes
_ALIGN = {QT.Q4_K: 4}
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _f16(p, mask):
    """The little-endian fp16 at byte pointers p (any shape), as fp32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scales(sc_p, s, mask):
    """Q4_K / Q5_K 6-bit scale and min of sub-block s from the 12 packed bytes at sc_p:
    s < 4: sc = scales[s] & 63, mn = scales[s+4] & 63; s >= 4: sc = (scales[s+4] & 15) |
    (scales[s-4] >> 6) << 4, mn = (scales[s+4] >> 4) | (scales[s] >> 6) << 4."""
    lo = s < 4
    a = tl.load(sc_p + s, mask=mask, other=0)  # scales[s]
    c = tl.load(sc_p + s + 4, mask=mask & (s < 8), other=0)  # scales[s+4] (s+4 <= 11)
    e = tl.load(sc_p + tl.where(lo, s, s - 4), mask=mask, other=0)  # scales[s-4] for s >= 4
    sc = tl.where(lo, a & 63, (c & 15) | ((e >> 6) << 4))
    mn = tl.where(lo, c & 63, (c >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def _decode(w_ptr, lut_ptr, roff, nmask, kb, NB, QTYPE: tl.constexpr, G: tl.constexpr):
    """Blocks kb .. kb+G-1 of the rows at byte offsets roff [BLOCK_N, 1, 1] -> fp32 weights of
    any shape whose row-major order is [BLOCK_N, G * bs] in element order (callers reshape).
    Blocks >= NB decode to 0."""
    if QTYPE <= 3:  # 32-element blocks: [BLOCK_N, G, 32]
        j = tl.arange(0, G)[None, :, None]
        i = tl.arange(0, 32)[None, None, :]
        blk = kb + j
        m3 = nmask & (blk < NB)  # [BLOCK_N, G, 1]
        if QTYPE == 0:  # Q8_0: d @0 | qs:i8[32] @2 (16-bit loads measured no faster on an H100)
            base = w_ptr + roff + blk * 34
            d = _f16(base, m3)
            q = tl.load(base + 2 + i, mask=m3, other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32) * d
        elif QTYPE == 1:  # Q4_0: d @0 | qs[16] @2; x = d * (q - 8)
            base = w_ptr + roff + blk * 18
            d = _f16(base, m3)
            b = tl.load(base + 2 + (i % 16), mask=m3, other=0)
            q = ((b >> ((i // 16) * 4).to(tl.uint8)) & 0xF).to(tl.int32) - 8
            w = q.to(tl.float32) * d
        elif QTYPE == 2:  # Q4_1: d @0 | m @2 | qs[16] @4; x = d * q + m
            base = w_ptr + roff + blk * 20
            d = _f16(base, m3)
            mn = _f16(base + 2, m3)
            b = tl.load(base + 4 + (i % 16), mask=m3, other=0)
            q = (b >> ((i // 16) * 4).to(tl.uint8)) & 0xF
            w = q.to(tl.float32) * d + mn
        else:  # Q5_0: d @0 | qh:u32 @2 | qs[16] @6; x = d * (q - 16)
            base = w_ptr + roff + blk * 22
            d = _f16(base, m3)
            b = tl.load(base + 6 + (i % 16), mask=m3, other=0)
            h = tl.load(base + 2 + i // 8, mask=m3, other=0)
            q = ((b >> ((i // 16) * 4).to(tl.uint8)) & 0xF) | (
                ((h >> (i % 8).to(tl.uint8)) & 1) << 4
            )
            w = (q.to(tl.int32) - 16).to(tl.float32) * d
    elif QTYPE == 4:
        # Q4_K: d @0 | dmin @2 | scales[12] @4 | qs[128] @16. qs is read as 32-bit words (a
        # quarter of the load instructions of byte loads; blocks and rows are 4-byte aligned):
        # word wi of chunk c holds bytes 4wi..4wi+3, whose low nibbles are elements 64c + 4wi + j
        # and high nibbles 64c + 32 + 4wi + j, so [BN, G, c, hi, wi, j] is element order.
        gb = tl.arange(0, G)[None, :, None, None, None, None]
        c = tl.arange(0, 4)[None, None, :, None, None, None]
        hi = tl.arange(0, 2)[None, None, None, :, None, None]
        wi = tl.arange(0, 8)[None, None, None, None, :, None]
        j = tl.arange(0, 4)[None, None, None, None, None, :]
        blk = kb + gb
        m6 = nmask[:, :, :, None, None, None] & (blk < NB)
        base = w_ptr + roff[:, :, :, None, None, None] + blk * 144
        s = 2 * c + hi  # sub-block of 32 elements, [1, 1, 4, 2, 1, 1]
        sc, mn = _k_scales(base + 4, s, m6)
        dl = _f16(base, m6) * sc.to(tl.float32)
        ml = _f16(base + 2, m6) * mn.to(tl.float32)
        wp = (base + 16).to(tl.pointer_type(tl.int32)) + c * 8 + wi
        word = tl.load(wp, mask=m6, other=0)  # [BN, G, 4, 1, 8, 1]
        q = (word >> (4 * hi + 8 * j)) & 0xF  # [BN, G, 4, 2, 8, 4]
        w = q.to(tl.float32) * dl - ml
    elif QTYPE == 6:
        # Q5_K: d @0 | dmin @2 | scales[12] @4 | qh[32] @16 | qs[128] @48; bit s of qh[t] is the
        # fifth bit of element t of sub-block s. [BLOCK_N, 8G, 32]
        u = tl.arange(0, 8 * G)[None, :, None]
        t = tl.arange(0, 32)[None, None, :]
        blk = kb + u // 8
        s = u % 8  # sub-block
        m3 = nmask & (blk < NB)
        base = w_ptr + roff + blk * 176
        sc, mn = _k_scales(base + 4, s, m3)
        dl = _f16(base, m3) * sc.to(tl.float32)
        ml = _f16(base + 2, m3) * mn.to(tl.float32)
        b = tl.load(base + 48 + (s // 2) * 32 + t, mask=m3, other=0)
        q = (b >> ((s % 2) * 4).to(tl.uint8)) & 0xF
        h = tl.load(base + 16 + t, mask=m3, other=0)
        q = q | (((h >> s.to(tl.uint8)) & 1) << 4)
        w = q.to(tl.float32) * dl - ml
    elif QTYPE == 7:  # IQ4_XS: d @0 | scales_h:u16 @2 | scales_l[4] @4 | qs[128] @8; [BN, 8G, 32]
        u = tl.arange(0, 8 * G)[None, :, None]
        t = tl.arange(0, 32)[None, None, :]
        blk = kb + u // 8
        s = u % 8  # sub-block: 6-bit scale = nibble s%2 of scales_l[s//2] | bits 2s.. of scales_h
        m3 = nmask & (blk < NB)
        base = w_ptr + roff + blk * 136
        d = _f16(base, m3)
        sh = tl.load(base + 2, mask=m3, other=0).to(tl.int32) | (
            tl.load(base + 3, mask=m3, other=0).to(tl.int32) << 8
        )
        sl = tl.load(base + 4 + s // 2, mask=m3, other=0).to(tl.int32)
        sc = (((sl >> ((s % 2) * 4)) & 15) | (((sh >> (2 * s)) & 3) << 4)) - 32
        b = tl.load(base + 8 + s * 16 + (t % 16), mask=m3, other=0)
        q = (b >> ((t // 16) * 4).to(tl.uint8)) & 0xF
        w = tl.load(lut_ptr + q.to(tl.int32)).to(tl.float32) * (d * sc.to(tl.float32))
    else:  # Q6_K: ql[128] @0 | qh[64] @128 | scales:i8[16] @192 | d @208; [BLOCK_N, 16G, 16]
        u = tl.arange(0, 16 * G)[None, :, None]
        t = tl.arange(0, 16)[None, None, :]
        blk = kb + u // 16
        sb = u % 16  # scale index = element // 16
        m3 = nmask & (blk < NB)
        base = w_ptr + roff + blk * 210
        d = _f16(base + 208, m3)
        sc = tl.load(base + 192 + sb, mask=m3, other=0).to(tl.int8, bitcast=True)
        dl = d * sc.to(tl.float32)
        el = sb * 16 + t  # element in the super-block
        hf = el // 128
        g = (el % 128) // 32
        r = el % 32
        ql = tl.load(base + hf * 64 + (g % 2) * 32 + r, mask=m3, other=0)
        qh = tl.load(base + 128 + hf * 32 + r, mask=m3, other=0)
        q = ((ql >> ((g // 2) * 4).to(tl.uint8)) & 0xF) | (((qh >> (g * 2).to(tl.uint8)) & 3) << 4)
        w = (q.to(tl.int32) - 32).to(tl.float32) * dl
    return w


# y[M, N] fp32 = x[M, K] @ dequant(W)^T
#   x_ptr: [M, K] fp16/fp32/bf16, strides (sxm, sxk)
#   w_ptr: uint8 [N, NB * ts], row stride swn bytes, bytes contiguous within a row
#   y_ptr: fp32 [M, N], strides (sym, syn)
#   M, N, K: sizes; NB = K / bs blocks per row
#   QTYPE: constexpr code (_CODES); BS: block size (32 or 256); G: blocks per K step (pow2)
#   BLOCK_M, BLOCK_N: rows of x / W per program (pow2); USE_DOT: tl.dot (needs BLOCK_M >= 16
#   on a GPU) instead of a broadcast multiply + sum
#   KB_SPLIT: blocks of K per program along grid axis 2 (split-K; a multiple of G); with more
#   than one split each writes its partial sums to y_ptr + pid_k * M * N (fp32 [splits, M, N])
# grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), cdiv(NB, KB_SPLIT))
@triton.jit
def _qgemv_kernel(
    x_ptr,
    w_ptr,
    lut_ptr,
    y_ptr,
    M,
    N,
    K,
    NB,
    sxm,
    sxk,
    swn,
    sym,
    syn,
    KB_SPLIT,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    kb0 = pid_k * KB_SPLIT
    kb1 = tl.minimum(kb0 + KB_SPLIT, NB)
    BK: tl.constexpr = G * BS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n3 = offs_n[:, None, None]
    roff = n3.to(tl.int64) * swn
    nmask = n3 < N
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1, G):
        w = tl.reshape(_decode(w_ptr, lut_ptr, roff, nmask, kb, kb1, QTYPE, G), (BLOCK_N, BK))
        k = kb * BS + offs_k
        xm = (offs_m[:, None] < M) & (k[None, :] < K)
        xp = x_ptr + offs_m[:, None].to(tl.int64) * sxm + k[None, :] * sxk
        xk = tl.load(xp, mask=xm, other=0.0).to(tl.float32)  # bf16 math is cast away at once
        if USE_DOT:
            acc += tl.dot(xk, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.sum(xk[:, None, :] * w[None, :, :], axis=2)
    ym = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    yp = y_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * sym
    tl.store(yp + offs_n[None, :] * syn, acc, mask=ym)


_LUTS: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    """The IQ4 code book as int8 on `device` (read by IQ4_XS; a dummy argument for other types)."""
    if device not in _LUTS:
        _LUTS[device] = torch.tensor(_IQ4_KVALUES, dtype=torch.int8, device=device)
    return _LUTS[device]


# GPU launch configurations: (block_n, blocks_per_step G, num_warps, dot, programs per SM) per
# (type name, regime); a type missing here uses the row of its block size (32 or 256). Split-K is
# derived at run time from "programs per SM" (_split). Measured on an H100 by
# scripts/tune_triton_gemv.py (docs/BENCHMARKS.md).
#   regime "gemv": M == 1 (broadcast multiply + sum); "small": 2 <= M <= 16 (dot=True: BLOCK_M
#   = 16 through tl.dot, the padded rows cost no weight bytes)
_GPU_CONFIG: dict[tuple, tuple[int, int, int, bool, int]] = {
    # H100 80GB HBM3, N = K = 4096, copy ~2380 GB/s (scripts/tune_triton_gemv.py, 2026-11-24;
    # Q4_K with its 32-bit quant loads, the other rows with byte loads)
    ("Q4_K", "gemv"): (8, 2, 2, False, 2),  # 536 GB/s
    ("Q4_K", "small"): (8, 2, 1, False, 2),  # 414 GB/s (M = 4)
    ("Q8_0", "gemv"): (16, 8, 1, False, 16),  # 912 GB/s
    ("Q8_0", "small"): (16, 8, 1, False, 16),  # 675 GB/s
    ("Q6_K", "gemv"): (8, 2, 2, False, 2),  # 511 GB/s
    ("Q6_K", "small"): (8, 2, 1, False, 16),  # 450 GB/s
    ("Q5_0", "gemv"): (4, 8, 1, False, 16),  # 322 GB/s
    ("Q5_0", "small"): (4, 8, 1, False, 16),  # 289 GB/s
    ("Q4_1", "gemv"): (16, 8, 1, False, 16),  # 485 GB/s
    ("Q4_1", "small"): (16, 8, 1, False, 16),  # 381 GB/s
    # untuned types take their block size's row (Q4_0 ~ Q4_1; Q5_K, IQ4_XS ~ Q4_K); the fp32
    # tl.dot path (BLOCK_M = 16) measured 3-4x slower than the broadcast one at M = 4
    (32, "gemv"): (16, 8, 1, False, 16),
    (32, "small"): (16, 8, 1, False, 16),
    (256, "gemv"): (4, 2, 1, False, 4),  # Q4_K's rows with byte loads
    (256, "small"): (8, 2, 2, False, 2),
}


def load_gpu_config(path: str | os.PathLike) -> None:
    """Override _GPU_CONFIG rows from a JSON file written by scripts/tune_triton_gemv.py
    ({"Q4_K:gemv": [block_n, G, warps, dot, programs_per_sm], ...}): a tuning for another GPU.
    Read at import from $LLMKIT_TRITON_GEMV_CONFIG when set."""
    try:
        rows = json.loads(Path(path).read_text())
        for key, row in rows.items():
            name, regime = key.split(":")
            bn, g, warps, dot, pps = row
            _GPU_CONFIG[(name, regime)] = (int(bn), int(g), int(warps), bool(dot), int(pps))
    except (OSError, ValueError, TypeError) as e:
        raise LlmkitError(f"cannot read the Triton GEMV configuration {path}: {e}") from None


if os.environ.get("LLMKIT_TRITON_GEMV_CONFIG"):
    load_gpu_config(os.environ["LLMKIT_TRITON_GEMV_CONFIG"])


def _gpu_config(qtype: QT, bs: int, M: int) -> tuple[int, int, int, bool, int]:
    regime = "gemv" if M == 1 else "small"
    return _GPU_CONFIG.get((qtype.name, regime)) or _GPU_CONFIG[(bs, regime)]


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(n_programs: int, nb: int, g: int, pps: int, device: torch.device) -> int:
    """K splits that bring the grid to ~pps programs per SM (decode GEMVs have too few output
    rows to fill a GPU, and each program's K loop is a chain of dependent loads)."""
    want = -(-pps * _sm_count(device) // max(n_programs, 1))
    return max(1, min(want, nb // g))


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def qgemv(
    x: torch.Tensor,
    w: torch.Tensor,
    qtype: QT,
    *,
    block_n: int | None = None,
    blocks_per_step: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    use_dot: bool | None = None,
    programs_per_sm: int | None = None,
) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ W^T, W the raw GGUF bytes uint8 [N, row_bytes] of `qtype`.

    x may have extra leading dims ([..., K] -> [..., N]). Raises LlmkitError for unsupported
    types, dtypes or mismatched shapes. The keyword arguments override the launch configuration
    (tuning and tests); by default it comes from _GPU_CONFIG on a GPU."""
    try:
        qtype = QT(qtype)
    except ValueError:
        raise LlmkitError(f"unknown tensor type {qtype!r}") from None
    code = _CODES.get(qtype)
    if code is None:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise LlmkitError(f"triton qgemv does not support {qtype.name} (supported: {names})")
    bs, ts = GGML_QUANT_SIZES[qtype]
    if w.dtype == torch.int8:
        w = w.view(torch.uint8)
    if w.dtype != torch.uint8 or w.dim() != 2:
        raise LlmkitError(
            f"{qtype.name} weight must be uint8 bytes [N, row_bytes], got {w.dtype} "
            f"{tuple(w.shape)}"
        )
    if x.dtype not in _X_DTYPES:
        raise LlmkitError(f"triton qgemv input must be fp32/fp16/bf16, got {x.dtype}")
    if x.device != w.device:
        raise LlmkitError(f"input on {x.device} but weight on {w.device}")
    N, rb = w.shape
    if rb % ts:
        raise LlmkitError(f"{qtype.name} row of {rb} bytes is not whole {ts}-byte blocks")
    NB = rb // ts
    K = NB * bs
    if x.shape[-1] != K:
        raise LlmkitError(f"input has {x.shape[-1]} columns but {qtype.name} rows hold {K}")
    if w.stride(1) != 1:
        w = w.contiguous()
    if w.data_ptr() % _ALIGN.get(qtype, 1) or w.stride(0) % _ALIGN.get(qtype, 1):
        w = w.clone()  # a fresh copy is aligned
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0 or N == 0:
        return torch.empty((*lead, N), dtype=torch.float32, device=x.device)

    if _interpreting() or x.device.type != "cuda":
        # the interpreter's cost is per op: few fat programs, no split
        block_m = min(16, triton.next_power_of_2(M))
        bn, g, warps, dot, pps = 64, (8 if bs == 32 else 1), 4, block_m >= 16, 0
    else:
        bn, g, warps, dot, pps = _gpu_config(qtype, bs, M)
        # the broadcast tile [BLOCK_M, BLOCK_N, G * bs] lives in registers: more than 4 rows
        # become more programs along M (each re-reads W, mostly from L2)
        block_m = 16 if dot else min(4, triton.next_power_of_2(M))
    bn = block_n or bn
    g = blocks_per_step or g
    warps = num_warps or warps
    pps = programs_per_sm or pps
    if use_dot is not None:
        dot = use_dot
        block_m = 16 if dot else min(block_m, triton.next_power_of_2(M))
    grid_nm = triton.cdiv(N, bn) * triton.cdiv(M, block_m)
    split = split_k or (_split(grid_nm, NB, g, pps, x.device) if pps else 1)
    per = triton.cdiv(triton.cdiv(NB, split), g) * g  # blocks per split, a multiple of G
    split = triton.cdiv(NB, per)
    y = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, block_m), split)
    _qgemv_kernel[grid](
        x2,
        w,
        _lut(x.device),
        y,
        M,
        N,
        K,
        NB,
        x2.stride(0),
        x2.stride(1),
        w.stride(0),
        y.stride(1),
        y.stride(2),
        per,
        QTYPE=code,
        BS=bs,
        G=g,
        BLOCK_M=block_m,
        BLOCK_N=bn,
        USE_DOT=dot,
        num_warps=warps,
    )
    y = y[0] if split == 1 else y.sum(0)  # fixed order: deterministic, unlike atomics
    return y.reshape(*lead, N)
