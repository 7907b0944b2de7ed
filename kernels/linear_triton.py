"""GPU matmuls on the GGUF bytes: Triton GEMV for the decode / verify regime, a per-call Triton
dequantize plus cuBLAS for prefill (the "triton" rows of the kernel table in kernels/ops.py)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from llmkit.kernels.backend import GEMV_MAX_ROWS
from llmkit.quant.tensor import QTensor

STORED_DTYPE = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
FLOAT_TYPES = frozenset(STORED_DTYPE)


def _merge_same_type(parts: list) -> list:
    """Adjacent fused parts of one type (same row width) become one tensor: one kernel launch
    instead of one per part plus a concatenation (q/k/v and gate/up are usually one type)."""
    out = []
    for qt, run in itertools.groupby(parts, key=lambda p: p[1]):
        run = list(run)
        rows = sum(shape[0] for _, _, shape in run)
        data = run[0][0] if len(run) == 1 else torch.cat([a for a, _, _ in run])
        out.append((data, qt, (rows, *run[0][2][1:])))
    return out


class TritonLinear:
    """GEMV straight from the GGUF bytes (one call per run of same-type fused parts); GEMM on a
    per-call dequantized copy. Float-typed weights (F32/F16/BF16) stay in their stored dtype and
    are plain torch matmuls in that dtype (cuBLAS on a GPU: the "bf16 weights and torch matmuls"
    baseline of the benchmarks). Everything lives on the backend device."""

    def __init__(self, weights: list[QTensor], device: torch.device):
        self.parts = []  # (uint8 bytes [N, row_bytes] or dense [N, K] in the stored dtype, ...)
        for w in weights:
            if w.qtype in FLOAT_TYPES:
                self.parts.append(
                    (w.dequantize(STORED_DTYPE[w.qtype]).to(device), w.qtype, w.shape)
                )
            else:
                raw = w.raw.reshape(w.shape[0], -1).view(torch.uint8)
                self.parts.append((raw.to(device), w.qtype, w.shape))
        self.parts = _merge_same_type(self.parts)
        self.out_features = sum(s[0] for _, _, s in self.parts)
        self.in_features = weights[0].shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a, _, _ in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from llmkit.kernels.triton_dequant import qdequant  # triton imports only when used
        from llmkit.kernels.triton_gemv import qgemv
        from llmkit.quant.dequant import dequantize

        gemv = x.shape[0] <= GEMV_MAX_ROWS
        dt = torch.float32 if x.device.type == "cpu" else torch.bfloat16  # GEMM operand dtype
        ys = []
        for a, qt, shape in self.parts:
            if qt in FLOAT_TYPES:
                ys.append(F.linear(x.to(a.dtype), a).float())
            elif gemv:
                ys.append(qgemv(x, a, qt))  # [M, N] fp32, fp32 accumulation
            else:
                w = (  # [N, K]: one Triton pass on a GPU; the torch decoders on CPU
                    qdequant(a, qt, dt)
                    if a.device.type == "cuda"
                    else dequantize(a, qt, shape, dtype=dt)
                )
                ys.append(F.linear(x.to(dt), w).float())
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
