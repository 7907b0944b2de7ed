"""CPU matmuls on PyTorch kernels over a dense copy of the weight (the fallback of the kernel
table in kernels/ops.py), and the per-expert wrapper used by MoE layers.

Why the bf16 rows: on CPUs without native bf16 (AVX2-only), oneDNN emulates bf16, so a bf16 matmul
costs linear in M; running the M = 1 kernel row by row costs the same and gives every row exactly
the arithmetic of a single-token step (batch invariance: greedy MTP output stays token-for-token
identical). A GEMM upcasts to fp32 (emulated bf16 GEMM runs ~20 GFLOP/s against ~170 for fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.kernels.backend import GEMV_MAX_ROWS, cpu_has_native_bf16


def _dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] fp32 @ w [out, in]^T -> [M, out] fp32 for a dense copy, kernel by regime."""
    if w.dtype != torch.bfloat16:
        return F.linear(x, w)
    m = x.shape[0]
    if m == 1 or cpu_has_native_bf16():
        return F.linear(x.to(torch.bfloat16), w).float()
    if m <= GEMV_MAX_ROWS:
        return torch.cat([F.linear(x[i : i + 1].to(torch.bfloat16), w) for i in range(m)]).float()
    return F.linear(x, w.float())


class DenseLinear:
    """y[M, out] = x[M, in] @ W^T with W dequantized once into the backend dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _dense_matmul(x, self.weight)  # [M, in] fp32 -> [M, out] fp32


class ExpertLinear:
    """y[M, out] = x[M, in] @ W[e]^T for one expert e of a stacked [E, out, in] weight (MoE): only
    the experts a batch selects are ever multiplied."""

    def __init__(self, experts: list):
        self.experts = experts  # one linear per expert
        self.n_expert = len(experts)
        self.out_features, self.in_features = experts[0].out_features, experts[0].in_features

    def __call__(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        # x: [M, in] fp32, the rows routed to this expert -> [M, out] fp32
        return self.experts[expert](x)
