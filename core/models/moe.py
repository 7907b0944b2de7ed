"""Routed mixture-of-experts FFN, as llama.cpp's `build_moe_ffn` (no expert groups), plus the clamped
SwiGLU that step35 uses for dense, shared and routed experts.

Per token row f [H]: probs = sigmoid (or softmax) of the router logits f @ W_router^T (fp32);
the top-k experts are chosen on probs + exp_probs_b (the bias only steers selection); their weights
are the unbiased probs, optionally renormalised (sum clamped to 2^-14) and scaled; output =
sum_j w_j * down_j(swiglu(gate_j(f), up_j(f))).

Only the selected experts run: rows are grouped by expert, so each expert that appears in the batch
makes one matmul per weight over all of its rows (decode: k experts x 3 small GEMVs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.kernels.linear_torch import ExpertLinear

GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # llama.cpp's expert_gating_func enum values
WEIGHTS_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the weight sum before normalising (fp16 min)
CLAMP_MIN = 1e-6  # a SwiGLU limit at or below this means "no clamp"


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) * up; with a limit, silu(gate) is capped above and up clipped to [-limit, limit]."""
    act = F.silu(gate)
    if limit > CLAMP_MIN:
        act = act.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return act * up


class RoutedExperts:
    def __init__(
        self,
        router: torch.Tensor,  # [E, H] fp32: routing is decided in full precision
        bias: torch.Tensor | None,  # [E] selection bias (exp_probs_b)
        gate: ExpertLinear,  # [E, Fe, H]
        up: ExpertLinear,  # [E, Fe, H]
        down: ExpertLinear,  # [E, H, Fe]
        gating: int = GATING_SIGMOID,
        norm_weights: bool = False,
        scale: float = 0.0,
        limit: float = 0.0,
    ):
        if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise LlmkitError(f"expert gating function {gating} is not supported (1 or 2)")
        self.router, self.bias = router, bias
        self.gate, self.up, self.down = gate, up, down
        self.gating, self.norm_weights, self.scale, self.limit = gating, norm_weights, scale, limit
        self.n_expert = router.shape[0]

    def route(self, f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """f [T, H] -> (experts [T, k] long, weights [T, k] fp32)."""
        logits = F.linear(f, self.router)  # [T, E]
        probs = logits.sigmoid() if self.gating == GATING_SIGMOID else logits.softmax(-1)
        sel = probs + self.bias if self.bias is not None else probs
        top = sel.topk(k, dim=-1).indices  # [T, k]
        w = probs.gather(1, top)
        if self.norm_weights:
            w = w / w.sum(-1, keepdim=True).clamp(min=WEIGHTS_SUM_MIN)
        if self.scale not in (0.0, 1.0):
            w = w * self.scale
        return top, w

    def __call__(self, f: torch.Tensor, k: int) -> torch.Tensor:
        top, w = self.route(f, k)
        out = torch.zeros_like(f)  # [T, H]
        # group the (row, slot) pairs by expert: one batched call per expert present
        for e in torch.unique(top).tolist():
            rows, slot = (top == e).nonzero(as_tuple=True)
            x = f[rows]  # [n_e, H]
            y = self.down(swiglu(self.gate(x, e), self.up(x, e), self.limit), e)  # [n_e, H]
            out.index_add_(0, rows, y * w[rows, slot, None])
        return out
