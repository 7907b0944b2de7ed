"""Gemma 4 mixture-of-experts FFN (26B-A4B), as llama.cpp's `gemma4` graph.

An MoE block runs the dense GeGLU FFN and the routed experts side by side on the post-attention
state x, and normalises their sum:
    s = post_ffw_norm_1(down(gelu_tanh(gate f) * up f)),  f = ffn_norm(x)
    m = post_ffw_norm_2(sum_j w_j * scale_e_j * down_e_j(gelu_tanh(gate_e_j g) * up_e_j g)),
        g = pre_ffw_norm_2(x)
    x += post_ffw_norm(s + m)
Routing (fp32): logits = W_router (rms(x) / sqrt(n_embd) * ffn_gate_inp.scale); softmax over all
experts; top-k; the k weights renormalised to sum 1 (sum clamped to 2^-14, as llama.cpp);
scale_e = ffn_down_exps.scale[e] (HF `router.per_expert_scale`), absent = 1. The experts come
as one fused `ffn_gate_up_exps` [E, 2 Fe, H] (gate rows first) or as ffn_gate_exps + ffn_up_exps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmkit.core.model.weights import TensorSpec
from llmkit.core.models.moe import WEIGHTS_SUM_MIN
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.backend import Backend
from llmkit.quant.tensor import QTensor

MOE_NORMS = {
    "pre_ffw_norm_2": "pre_ffw_norm_2",
    "post_ffw_norm_1": "post_ffw_norm_1",
    "post_ffw_norm_2": "post_ffw_norm_2",
}


def moe_specs(c, il: int) -> list[TensorSpec]:
    """Block il's MoE tensors (every block of an MoE checkpoint has them)."""
    H, E, Fe = c.n_embd, c.n_expert, c.n_ff_exp
    b = f"blk.{il}."
    return [
        TensorSpec(b + "ffn_gate_inp.weight", (E, H)),
        TensorSpec(b + "ffn_gate_inp.scale", (H,)),
        TensorSpec(b + "ffn_gate_up_exps.weight", (E, 2 * Fe, H), optional=True),
        TensorSpec(b + "ffn_gate_exps.weight", (E, Fe, H), optional=True),
        TensorSpec(b + "ffn_up_exps.weight", (E, Fe, H), optional=True),
        TensorSpec(b + "ffn_down_exps.weight", (E, H, Fe)),
        TensorSpec(b + "ffn_down_exps.scale", (E,), optional=True),
    ] + [TensorSpec(b + n + ".weight", (H,)) for n in MOE_NORMS.values()]


class Gemma4Experts:
    """The routed half of a Gemma 4 MoE block: x [T, H] -> the expert mix before post_ffw_norm_2."""

    def __init__(self, c, t: dict[str, QTensor], il: int, backend: Backend):
        b = f"blk.{il}."
        dev = backend.device
        self.eps, self.k = c.eps, c.top_k()
        self.router = t[b + "ffn_gate_inp.weight"].dequantize().to(dev)  # [E, H] fp32
        # the router input scale, with llama.cpp's 1 / sqrt(n_embd) folded in
        self.in_scale = (t[b + "ffn_gate_inp.scale"].dequantize() / math.sqrt(c.n_embd)).to(dev)
        s = t.get(b + "ffn_down_exps.scale")
        self.exp_scale = s.dequantize().to(dev) if s is not None else None
        backend.extra_bytes += self.router.numel() * self.router.element_size()
        norms = {a: t[b + n + ".weight"].dequantize() for a, n in MOE_NORMS.items()}
        self.pre_norm, self.post_norm = norms["pre_ffw_norm_2"], norms["post_ffw_norm_2"]
        self.post_norm_1 = norms["post_ffw_norm_1"]
        exp = lambda n: ops.make_expert_linear(backend, t[b + n + ".weight"])  # noqa: E731
        if b + "ffn_gate_up_exps.weight" in t:
            self.gate_up, self.gate, self.up = exp("ffn_gate_up_exps"), None, None
        elif b + "ffn_gate_exps.weight" in t and b + "ffn_up_exps.weight" in t:
            self.gate_up, self.gate, self.up = None, exp("ffn_gate_exps"), exp("ffn_up_exps")
        else:
            raise LlmkitError(
                f"gemma4: blk.{il} has a router but neither ffn_gate_up_exps nor "
                "ffn_gate_exps + ffn_up_exps"
            )
        self.down = exp("ffn_down_exps")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] (the post-attention state) -> (experts [T, k] long, weights [T, k] fp32)."""
        h = ops.rms_norm(x, None, self.eps) * self.in_scale
        probs = F.linear(h, self.router).softmax(-1)
        w, top = probs.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True).clamp(min=WEIGHTS_SUM_MIN)
        if self.exp_scale is not None:
            w = w * self.exp_scale[top]
        return top, w

    def _gate_up(self, g: torch.Tensor, e: int) -> torch.Tensor:
        if self.gate_up is not None:
            return self.gate_up(g, e)
        return torch.cat((self.gate(g, e), self.up(g, e)), dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        top, w = self.route(x)
        g = ops.rms_norm(x, self.pre_norm, self.eps)
        out = torch.zeros_like(g)
        for e in torch.unique(top).tolist():  # one batched call per expert the batch selects
            rows, slot = (top == e).nonzero(as_tuple=True)
            h = self._gate_up(g[rows].contiguous(), e)
            y = ops.linear(self.down.experts[e], h, glu_act="gelu_tanh")
            out.index_add_(0, rows, y * w[rows, slot, None])
        return ops.rms_norm(out, self.post_norm, self.eps)
