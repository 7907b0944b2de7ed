"""PyTorch matmuls over a dense copy of the weight: the "torch" family of the kernel table (the
float reference, and the fallback where the native library was not built), and the per-expert
wrapper used by MoE layers with any family."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseLinear:
    """y[M, out] = x[M, in] @ W^T with W dequantized once into the backend dtype (fp32 by
    default: exact; a bf16 copy halves the memory and rounds every weight)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, in] fp32 -> [M, out] fp32
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight).float()


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
