"""One-pass dequantization of GGUF blocks on a GPU: the GEMM (prefill) regime's weight operand.

W: uint8 [N, K / bs * ts] raw GGUF rows -> [N, K] bf16 (or fp16/fp32), decoded by the same
``_decode`` as the quantized GEMV (kernels/triton_gemv.py), so both read the blocks one way.
Per call: bytes = N * K / bs * ts (read) + N * K * esize (written); no flops beyond the decode.
Measured on an H100: Q4_K prefill of a 1.1B model went from 1.9k to 18.6k tokens/s against the
torch decoders (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels.triton_gemv import _ALIGN, _CODES, _decode, _lut


# W[N, K] (out dtype) = dequant(W bytes): the GEMM regime's operand, decoded by the same _decode
#   w_ptr: uint8 [N, NB * ts] (row stride swn bytes); o_ptr: [N, K] contiguous
# grid: (cdiv(N, BLOCK_N), cdiv(NB, G))
@triton.jit
def _dequant_kernel(
    w_ptr,
    lut_ptr,
    o_ptr,
    N,
    K,
    NB,
    swn,
    QTYPE: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kb = tl.program_id(1) * G
    BK: tl.constexpr = G * BS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = offs_n[:, None, None]
    w = _decode(w_ptr, lut_ptr, n3.to(tl.int64) * swn, n3 < N, kb, NB, QTYPE, G)
    w = tl.reshape(w, (BLOCK_N, BK))
    k = kb * BS + tl.arange(0, BK)
    op = o_ptr + offs_n[:, None].to(tl.int64) * K + k[None, :]
    tl.store(op, w.to(o_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (k[None, :] < K))


def qdequant(w: torch.Tensor, qtype: QT, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [N, row_bytes] GGUF rows of `qtype` -> [N, K] `dtype` (one pass: read ts bytes and
    write bs * esize bytes per block), for the GEMM regime on a GPU."""
    code = _CODES.get(QT(qtype))
    if code is None:
        raise LlmkitError(f"triton dequant does not support {QT(qtype).name}")
    bs, ts = GGML_QUANT_SIZES[qtype]
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] % ts:
        raise LlmkitError(f"{qtype.name} weight must be uint8 [N, whole {ts}-byte blocks]")
    if w.stride(1) != 1:
        w = w.contiguous()
    if w.data_ptr() % _ALIGN.get(qtype, 1) or w.stride(0) % _ALIGN.get(qtype, 1):
        w = w.clone()  # a fresh copy is aligned
    N, NB = w.shape[0], w.shape[1] // ts
    K = NB * bs
    out = torch.empty((N, K), dtype=dtype, device=w.device)
    g = 8 if bs == 32 else 1
    bn = 16
    grid = (triton.cdiv(N, bn), triton.cdiv(NB, g))
    _dequant_kernel[grid](
        w, _lut(w.device), out, N, K, NB, w.stride(0), QTYPE=code, BS=bs, G=g, BLOCK_N=bn
    )
    return out
