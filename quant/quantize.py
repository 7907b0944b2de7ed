"""ggml block quantizers in vectorized torch, byte-identical to ggml's reference (`quantize_row_*_ref`,
the path `ggml_quantize_chunk` / llama-quantize takes without an importance matrix): used for the
quantized KV cache and by `llm quantize`. The K-quants live in `kquants.py`, IQ4_NL/IQ4_XS in
`iquants.py`; `quantize()` dispatches over all of them.

Q8_0 (32 values -> 34 bytes): d = max|x| / 127 (stored fp16), q = round-half-away(x / d) as int8.
Q4_0 (32 values -> 18 bytes): m = the value of largest magnitude (signed), d = m / -8 (fp16),
q = min(15, trunc(x / d + 8.5)); byte j holds q_j (low nibble) and q_{j+16} (high nibble).
Q4_1 (32 -> 20: d @0 | m @2 | qs[16] @4): m = min, d = (max - min) / 15, q = min(15, trunc((x - m)/d + .5)).
Q5_0 (32 -> 22: d @0 | qh:u32 @2 | qs[16] @6): like Q4_0 with d = m / -16, q in 0..31; bit 4 of q_j
is bit j of qh. Q5_1 (32 -> 24: d @0 | m @2 | qh @4 | qs[16] @8): like Q4_1 with d = (max - min) / 31.

With an importance matrix (`imatrix`: one weight per column, llama.cpp's `quant_weights`) the
Q4_0/Q4_1/Q5_0/Q5_1 and K/IQ4 types use ggml's weighted searches (`quantize_row_*_impl`); Q8_0, F16
and BF16 ignore it, as in llama.cpp.

The K-quants, IQ4_NL/IQ4_XS and (without an importance matrix) Q4_0..Q8_0 run natively on CPU
tensors (quant/native.py: the same algorithm in C, byte-identical, multithreaded) when the native
library is built; the torch code here stays the reference, the fallback and the path for tensors
on other devices (`native=False` forces it).
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.quant import iquants as iq
from llmkit.quant import kquants as kq
from llmkit.quant import native as quant_native

BLOCK = 32


def _roundf(x: torch.Tensor) -> torch.Tensor:
    # C roundf (half away from zero), written like gguf-py so float edge cases agree
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise LlmkitError(
            f"cannot quantize rows of {x.shape[-1]} values: not a multiple of {BLOCK}"
        )
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)  # [..., nb, 32]


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).view(torch.uint8)  # [..., nb, 2] little-endian


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    b = _blocks(x)
    d = b.abs().amax(-1, keepdim=True) / 127  # [..., nb, 1]
    q = _roundf(b * _inv(d)).to(torch.int8).view(torch.uint8)  # [..., nb, 32]
    out = torch.cat((_fp16_bytes(d), q), dim=-1)  # [..., nb, 34]
    return out.reshape(*x.shape[:-1], -1)


def _signed_absmax(b: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per block [..., nb, 1], first occurrence; +0.0 for a block
    of zeros whatever their signs (ggml starts from max = 0.0f and never replaces it)."""
    a = b.abs()
    m = torch.gather(b, -1, a.argmax(-1, keepdim=True))
    return torch.where(a.amax(-1, keepdim=True) == 0, torch.zeros_like(m), m)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    b = _blocks(x)
    d = _signed_absmax(b) / -8  # [..., nb, 1]
    q = torch.trunc(b * _inv(d) + 8.5).clamp(0, 15).to(torch.uint8)  # [..., nb, 32]
    packed = q[..., :16] | (q[..., 16:] << 4)  # [..., nb, 16]
    out = torch.cat((_fp16_bytes(d), packed), dim=-1)  # [..., nb, 18]
    return out.reshape(*x.shape[:-1], -1)


def _min_max_blocks(x: torch.Tensor, nmax: int):
    """Q4_1/Q5_1: -> (blocks [..., nb, 32], d fp32 [..., nb, 1], min fp32, 1/d or 0)."""
    b = _blocks(x)
    mn = b.amin(-1, keepdim=True)
    d = (b.amax(-1, keepdim=True) - mn) / nmax
    return b, d, mn, _inv(d)


def _pack5(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., 32] in 0..31 -> (qh bytes [..., 4] little-endian u32, qs [..., 16])."""
    qs = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)
    bits = (q >> 4).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    qh = bits.sum(-1, keepdim=True)  # distinct bits: sum == or
    qh = ((qh >> torch.arange(0, 32, 8, dtype=torch.int64)) & 0xFF).to(torch.uint8)
    return qh, qs


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    b, d, mn, idv = _min_max_blocks(x, 15)
    q = torch.trunc((b - mn) * idv + 0.5).clamp(max=15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    out = torch.cat((_fp16_bytes(d), _fp16_bytes(mn), packed), dim=-1)  # [..., nb, 20]
    return out.reshape(*x.shape[:-1], -1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    b = _blocks(x)
    d = _signed_absmax(b) / -16
    q = torch.trunc(b * _inv(d) + 16.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _pack5(q)
    out = torch.cat((_fp16_bytes(d), qh, qs), dim=-1)  # [..., nb, 22]
    return out.reshape(*x.shape[:-1], -1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    b, d, mn, idv = _min_max_blocks(x, 31)
    # (uint8_t)(v + 0.5f) with no clamp: v <= 31 by construction
    q = torch.trunc((b - mn) * idv + 0.5).clamp(0, 255).to(torch.uint8)
    qh, qs = _pack5(q)
    out = torch.cat((_fp16_bytes(d), _fp16_bytes(mn), qh, qs), dim=-1)  # [..., nb, 24]
    return out.reshape(*x.shape[:-1], -1)


# --- importance-weighted 32-value types (quantize_row_q{4,5}_{0,1}_impl) -----------------------


def _row_weights(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qw[j] * sqrtf(sigma2 + x[j]^2), sigma2 = sum(x^2) / n_per_row (summed in order).
    x: [R, n] rows, qw: [n] -> [R, n]."""
    x2 = x * x
    sigma2 = kq._seq(x2.t()) / x.shape[-1]
    # float64 sqrt rounded to float32 is exact (torch's float32 sqrt is not), as C's sqrtf
    return qw.float()[None, :] * torch.sqrt((sigma2[:, None] + x2).double()).float()


def _weighted_32(x: torch.Tensor, qw: torch.Tensor, qtype: QT) -> torch.Tensor:
    rows = x.float().reshape(-1, x.shape[-1])  # [R, n]
    w = _row_weights(rows, qw)
    xe = rows.reshape(-1, BLOCK).t().contiguous()  # element-major [32, R*nb]
    we = w.reshape(-1, BLOCK).t().contiguous()
    if qtype in (QT.Q4_0, QT.Q5_0):
        d, L = kq.make_qx_quants(xe, 8 if qtype == QT.Q4_0 else 16, we)
        head = [_fp16_bytes(d[:, None])]
    else:
        nmax = 15 if qtype == QT.Q4_1 else 31
        d, the_min, L = kq.make_qkx_quants(xe, we, nmax, -0.9, 0.05, 36, False, v3=True)
        head = [_fp16_bytes(d[:, None]), _fp16_bytes(-the_min[:, None])]
    q = L.t().to(torch.uint8)  # [R*nb, 32]
    if qtype in (QT.Q4_0, QT.Q4_1):
        body = [q[:, :16] | (q[:, 16:] << 4)]
    else:
        qh, qs = _pack5(q)
        body = [qh, qs]
    out = torch.cat(head + body, dim=-1)
    return out.reshape(*x.shape[:-1], -1)


def _float_type(dtype: torch.dtype):
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.float().to(dtype).view(torch.uint8)

    return fn


QUANTIZERS = {
    QT.Q8_0: quantize_q8_0,
    QT.Q4_0: quantize_q4_0,
    QT.Q4_1: quantize_q4_1,
    QT.Q5_0: quantize_q5_0,
    QT.Q5_1: quantize_q5_1,
    QT.Q2_K: kq.quantize_q2_k,
    QT.Q3_K: kq.quantize_q3_k,
    QT.Q4_K: kq.quantize_q4_k,
    QT.Q5_K: kq.quantize_q5_k,
    QT.Q6_K: kq.quantize_q6_k,
    QT.IQ4_NL: iq.quantize_iq4_nl,
    QT.IQ4_XS: iq.quantize_iq4_xs,
    QT.F16: _float_type(torch.float16),
    QT.BF16: _float_type(torch.bfloat16),
}
_WEIGHTED = {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS}
_WEIGHTED_32 = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1}


def quantize(
    x: torch.Tensor, qtype: QT, imatrix: torch.Tensor | None = None, native: bool = True
) -> torch.Tensor:
    """x: [..., n] float -> uint8 [..., n / block * type_size] in ggml block layout.

    imatrix: optional [n] importance weights (llama.cpp's per-column `in_sum2 / counts`); used by
    the types whose ggml quantizer takes `quant_weights`, ignored by Q8_0/F16/BF16.
    native: use the C quantizers where available (same bytes); False runs the torch reference."""
    fn = QUANTIZERS.get(qtype)
    if fn is None:
        raise LlmkitError(
            f"no quantizer for {qtype.name} (supported: {', '.join(q.name for q in QUANTIZERS)})"
        )
    block = GGML_QUANT_SIZES[qtype][0]
    if x.shape[-1] % block:
        raise LlmkitError(
            f"cannot quantize rows of {x.shape[-1]} values to {qtype.name}: "
            f"not a multiple of {block}"
        )
    if imatrix is not None:
        if imatrix.numel() != x.shape[-1]:
            raise LlmkitError(
                f"imatrix has {imatrix.numel()} weights for rows of {x.shape[-1]} values"
            )
        if qtype in _WEIGHTED_32:
            return _weighted_32(x, imatrix, qtype)
    if native and qtype in quant_native.TYPES and x.device.type == "cpu":
        out = quant_native.quantize(x, qtype, imatrix)
        if out is not None:
            return out
    if qtype in _WEIGHTED:
        qw = None if imatrix is None else imatrix.float().expand(x.shape).reshape(-1)
        return fn(x.float().reshape(-1), qw).reshape(*x.shape[:-1], -1)
    return fn(x)
