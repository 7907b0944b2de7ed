"""CPU GEMV for 4-bit GGUF types on PyTorch's packed int4 kernel: y = x @ W^T.

Q4_0, Q4_1 and Q4_K all store, per group of 32 weights, 4-bit codes q in 0..15 and an affine map.
PyTorch's `_weight_int4pack_mm_for_cpu` computes with w = (q - 8) * scale + zero per group of 32,
so each type maps onto it without re-quantizing:
  Q4_0: w = d * (q - 8)            -> scale = d,      zero = 0
  Q4_1: w = d * q + m              -> scale = d,      zero = m + 8 d
  Q4_K: w = d*sc * q - dmin*mn     -> scale = d*sc,   zero = 8 d*sc - dmin*mn  (per sub-block)
The codes are kept bit for bit; scale and zero are stored in bf16 (the kernel's activation dtype on
CPUs without native bf16 arithmetic), a relative rounding of at most 2^-9 per group — the same
order as the bf16 dense copy this replaces, which rounds every weight.

Per call (M rows): bytes = N * K / 2 (codes) + N * K / 32 * 4 (bf16 scale + zero) + M * K * 2 (x)
                   + M * N * 2 (y); flops = 2 * M * N * K. That is 0.625 bytes per weight against
2 for the bf16 copy. The kernel is row-independent: row i of an M-row call is bit-identical to a
1-row call on row i (tested), which keeps MTP verification batch-invariant.

Measured on a 2-vCPU AVX2 EPYC (scripts/bench_cpu_kernels.py): cheaper than bf16 dense for M <= ~64
and 3-4x cheaper at M = 4; above that dequantize-then-fp32-GEMM wins, so GEMM calls dequantize the
GGUF blocks per call (no second resident copy).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.quant.dequant import _f16, _k_scale_min, _nibbles
from llmkit.quant.tensor import QTensor

GROUP = 32
N_MULTIPLE = 16  # the packing kernel's requirement on out_features
PACKABLE_TYPES = frozenset({QT.Q4_0, QT.Q4_1, QT.Q4_K})


def available() -> bool:
    """The packed-int4 CPU ops exist in this torch build."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu"
    )


def int4_groups(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and affine map of a 4-bit tensor [N, K]: q uint8 [N, K] in 0..15 (element order),
    scale and zero fp32 [N, K / 32], with w = (q - 8) * scale + zero."""
    if qt.qtype not in PACKABLE_TYPES or len(qt.shape) != 2:
        raise LlmkitError(f"{qt.name}: {qt.qtype.name} has no int4 group form")
    n, k = qt.shape
    b = qt.raw.reshape(-1, qt.raw.shape[-1])  # [N, row_bytes]
    if qt.qtype == QT.Q4_K:
        b = b.reshape(-1, 144)  # [N * K/256, 144]
        nb = b.shape[0]
        d, dmin = _f16(b, 0), _f16(b, 2)  # [nb, 1]
        sc, mn = _k_scale_min(b[:, 4:16])  # [nb, 8]
        scale = d * sc.to(torch.float32)  # [nb, 8]
        zero = 8 * scale - dmin * mn.to(torch.float32)
        q = _nibbles(b[:, 16:144].reshape(nb, 4, 32)).reshape(nb, 8 * 32)
    else:
        ts = 18 if qt.qtype == QT.Q4_0 else 20
        b = b.reshape(-1, ts)  # [N * K/32, ts]
        d = _f16(b, 0)  # [nb, 1]
        q = _nibbles(b[:, ts - 16 :]).reshape(-1, 32)
        scale = d
        zero = torch.zeros_like(d) if qt.qtype == QT.Q4_0 else _f16(b, 2) + 8 * d
    return q.reshape(n, k), scale.reshape(n, k // GROUP), zero.reshape(n, k // GROUP)


class Int4Linear:
    """y[M, out] = x[M, in] @ W^T over one or more 4-bit GGUF weights fused along `out`."""

    def __init__(self, weights: list[QTensor], max_rows: int):
        parts = [int4_groups(w) for w in weights]
        q = torch.cat([p[0] for p in parts]).to(torch.int32)  # [N, K]
        scale = torch.cat([p[1] for p in parts])  # [N, K/32]
        zero = torch.cat([p[2] for p in parts])
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP:
            raise LlmkitError(f"int4 packing needs in_features % 32 == 0, got {self.in_features}")
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        # [K/32, N, 2] (scale, zero), the kernel's layout
        self.scale_zero = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
        self.weights = weights  # GGUF views (mmap): the GEMM regime dequantizes from them
        self.max_rows = max_rows

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        # x [M, K] fp32 -> [M, N] fp32 via bf16 activations (fp32 accumulation inside)
        return torch._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, GROUP, self.scale_zero
        ).float()

    def dense(self) -> torch.Tensor:
        """The exact fp32 weight [N, K], decoded from the GGUF blocks (GEMM regime)."""
        parts = [w.dequantize(torch.float32) for w in self.weights]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_rows:
            return self.gemv(x)
        return torch.nn.functional.linear(x, self.dense())
