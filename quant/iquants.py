"""IQ4_NL and IQ4_XS quantizers in vectorized torch, byte-identical to ggml's `quantize_iq4_nl` /
`quantize_iq4_xs` (`quantize_row_iq4_nl_impl` with ntry = 7), with or without importance weights.

Both map each value to the nearest entry of a fixed non-linear 16-level code book (KVALUES):

    IQ4_NL  32 values, 18 B: d:f16 @0 | qs[16] @2                  x = d * KVALUES[q]
    IQ4_XS 256 values, 136 B: d:f16 @0 | scales_h:u16 @2 | scales_l[4] @4 | qs[128] @8
            x = d * (ls - 32) * KVALUES[q], ls = 6-bit scale of the 32-value sub-block
            (low nibble in scales_l[ib/2], high 2 bits at bit 2*ib of scales_h)

In both, element j < 16 of a 32-value block is the low nibble of qs[j], element 16 + j its high
nibble. The search for each block's scale tries 15 candidate scales; sums run element by element
in fp32 (C's order) so the chosen scale, and thus every byte, matches.
"""

from __future__ import annotations

import functools

import torch

from llmkit.quant.kquants import GROUP_MAX_EPS, _chunked, _first_absmax, _fp16, _seq

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_KV = torch.tensor(KVALUES, dtype=torch.float32)
# x picks level i once 2x reaches val[i-1] + val[i] (best_index_int8: exact midpoints, ties go up).
# The midpoints are integers, so the level depends only on floor(2x): tabulate it over their range.
_MID2 = [KVALUES[i - 1] + KVALUES[i] for i in range(1, 16)]
_LO, _HI = _MID2[0] - 1, _MID2[-1]
_IDX = torch.tensor([sum(m <= f for m in _MID2) for f in range(_LO, _HI + 1)], dtype=torch.int64)
_LEVEL = _KV[_IDX]
# blocks (of 32 for IQ4_NL, 256 for IQ4_XS) per pass, so the [32, 16, M] candidate arrays stay small
CHUNK_BLOCKS = {"iq4_nl": 2048, "iq4_xs": 256}


def _lookup(table: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """table[floor(2v)] elementwise (NaN -> the top level, as C's comparisons all fail)."""
    f = torch.add(v, v).floor_().clamp_(_LO, _HI).nan_to_num_(nan=_HI).sub_(_LO)
    return torch.index_select(table, 0, f.to(torch.int32).reshape(-1)).reshape(v.shape)


def best_index(v: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues, v) elementwise -> int64 indices 0..15."""
    return _lookup(_IDX, v)


def _block_scales(xe: torch.Tensor, we: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Per-block scale search. xe, we: element-major [32, M] -> d [M] (0 for near-zero blocks).
    The 2 ntry + 2 candidate scales are independent: all are evaluated at once ([32, 16, M]), then
    chosen in C's order."""
    amax, mx = _first_absmax(xe)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    d = -mx / KVALUES[0]
    tries = torch.arange(-ntry, ntry + 1, dtype=torch.float32) + KVALUES[0]
    idv = torch.cat(((1 / d)[None], tries[:, None] / mx))  # [16, M]
    q = _lookup(_LEVEL, idv * xe[:, None])  # [32, 16, M]
    st = torch.empty((xe.shape[0], 2) + q.shape[1:])
    torch.mul(we[:, None], q, out=st[:, 1])  # w*q
    torch.mul(st[:, 1], xe[:, None], out=st[:, 0])  # w*q*x
    st[:, 1].mul_(q)  # w*q*q
    sqx, sq2 = _seq(st)  # [16, M] each
    d = sqx[0] / sq2[0]
    best = d * sqx[0]
    for k in range(1, idv.shape[0]):
        better = (sq2[k] > 0) & (sqx[k] * sqx[k] > best * sq2[k])
        d = torch.where(better, sqx[k] / sq2[k], d)
        best = torch.where(better, d * sqx[k], best)
    return torch.where(zero, torch.zeros_like(d), d)


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """L [..., 32k] indices -> bytes [..., 16k]: per 32 values, byte j = L[j] | L[16 + j] << 4."""
    q = L.to(torch.uint8).reshape(*L.shape[:-1], -1, 2, 16)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*L.shape[:-1], -1)


def _weights(xb: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """xb: [B, n] super-blocks -> weights [B, n] (x^2, or qw * sqrt(sigma2 + x^2))."""
    if qw is None:
        return xb * xb
    sigma2 = _seq((xb * xb).t()) * (2.0 / xb.shape[1])
    # float64 sqrt rounded to float32 is exact (torch's float32 sqrt is not), as C's sqrtf
    return qw.float().reshape(xb.shape) * torch.sqrt((sigma2[:, None] + xb * xb).double()).float()


@functools.partial(_chunked, block=32, chunks=CHUNK_BLOCKS)
def quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = x.float().reshape(-1, 32)  # [B, 32]
    w = _weights(xb, qw)
    d = _block_scales(xb.t().contiguous(), w.t().contiguous())  # [B]
    idv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    L = best_index(idv[:, None] * xb)
    dh = _fp16(d).view(torch.uint8).reshape(-1, 2)
    return torch.cat((dh, _pack_nibbles(L)), 1)


@functools.partial(_chunked, chunks=CHUNK_BLOCKS)
def quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = x.float().reshape(-1, 256)  # [B, 256]
    B = xb.shape[0]
    w = _weights(xb, qw)
    sc = _block_scales(xb.reshape(-1, 32).t().contiguous(), w.reshape(-1, 32).t().contiguous())
    sc = sc.reshape(B, 8)
    amax = sc.abs().amax(1)
    _, picked = _first_absmax(sc.t())
    max_scale = torch.where(amax > 0, picked, torch.zeros_like(picked))
    d = -max_scale / 32  # -0.0 for an all-zero super-block, stored as 0x8000 like C
    idv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    lv = torch.nan_to_num(torch.round(idv[:, None] * sc), nan=-32.0).clamp(-32, 31)  # [B, 8]
    dl = d[:, None] * lv
    idl = torch.where(dl != 0, 1 / dl, torch.zeros_like(dl))
    L = best_index(idl[..., None] * xb.reshape(B, 8, 32)).reshape(B, 256)
    ls = (lv + 32).to(torch.int32)  # [B, 8] in 0..63
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).to(torch.uint8)  # [B, 4]
    sh = ((ls >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(1)  # [B] u16
    scales_h = torch.stack((sh & 0xFF, sh >> 8), 1).to(torch.uint8)
    dh = _fp16(d).view(torch.uint8).reshape(-1, 2)
    return torch.cat((dh, scales_h, scales_l, _pack_nibbles(L)), 1)
