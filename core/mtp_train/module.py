"""The trainable NextN block: fp32 `nn.Parameter`s with the trunk Layer's attribute names, so
`nextn_dense.block_forward` (the inference math) runs on it with autograd.

Initialisation (why): the block body starts as a copy of the trunk's last layer (a working decoder
block for this residual stream), eh_proj as [0.01 * noise | I] scaled to the trunk hidden's typical
RMS (so x0 starts close to h_{p-1} itself), enorm/hnorm at 1 and shared_head_norm at the trunk's
output_norm: at step 0 the head already predicts roughly what the trunk's last layer would.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.core.models.nextn_dense import NEXTN_NORMS

LAYER_NORMS = {
    "llama": ("attn_norm", "ffn_norm"),
    "gemma3": ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "ffn_norm", "post_ffw_norm"),
}
# trainer attribute -> GGUF tensor name suffix (blk.N.<suffix>.weight)
GGUF_NORM_NAMES = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm",
    "post_ffw_norm": "post_ffw_norm",
}


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


class TrainBlock(nn.Module):
    """One NextN block (block body + eh_proj, enorm, hnorm, shared_head_norm) in fp32."""

    def __init__(self, kind: str, c, init: dict[str, torch.Tensor]):
        super().__init__()
        self.kind = kind
        self.split = self._split(kind, c)
        self.wqkv = _linear(torch.cat([init["attn_q"], init["attn_k"], init["attn_v"]]))
        self.wo = _linear(init["attn_output"])
        self.w_gate_up = _linear(torch.cat([init["ffn_gate"], init["ffn_up"]]))
        self.w_down = _linear(init["ffn_down"])
        self.eh_proj = _linear(init["eh_proj"])
        for n in LAYER_NORMS[kind] + NEXTN_NORMS:
            setattr(self, n, nn.Parameter(init[n].clone().float()))

    @staticmethod
    def _split(kind: str, c) -> tuple[int, int, int]:
        dv = c.head_dim if kind == "llama" else c.head_dim_v
        return (c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * dv)

    def gguf_tensors(self, il: int) -> dict[str, torch.Tensor]:
        """The block's tensors under their GGUF names (fp32, numpy-order shapes)."""
        b = f"blk.{il}."
        q, k, v = self.wqkv.weight.detach().split(self.split)
        gate, up = self.w_gate_up.weight.detach().chunk(2)
        out = {
            b + "attn_q.weight": q,
            b + "attn_k.weight": k,
            b + "attn_v.weight": v,
            b + "attn_output.weight": self.wo.weight.detach(),
            b + "ffn_gate.weight": gate,
            b + "ffn_up.weight": up,
            b + "ffn_down.weight": self.w_down.weight.detach(),
            b + "nextn.eh_proj.weight": self.eh_proj.weight.detach(),
        }
        for n in LAYER_NORMS[self.kind]:
            out[b + GGUF_NORM_NAMES[n] + ".weight"] = getattr(self, n).detach()
        for n in NEXTN_NORMS:
            out[b + f"nextn.{n}.weight"] = getattr(self, n).detach()
        return {k: t.contiguous().clone() for k, t in out.items()}


def init_from_trunk(kind: str, c, tensors, h_rms: float, gen: torch.Generator) -> dict:
    """Initial weights for a NextN block from the trunk's last layer (see the module docstring)."""
    b = f"blk.{c.n_layer - 1}."
    names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    init = {n: tensors[b + n + ".weight"].dequantize() for n in names}
    for n in LAYER_NORMS[kind]:
        init[n] = tensors[b + GGUF_NORM_NAMES[n] + ".weight"].dequantize()
    H = c.n_embd
    e_part = torch.randn(H, H, generator=gen) * (0.01 / H**0.5)
    init["eh_proj"] = torch.cat((e_part, torch.eye(H) * h_rms), dim=1)
    init["enorm"] = torch.ones(H)
    init["hnorm"] = torch.ones(H)
    init["shared_head_norm"] = tensors["output_norm.weight"].dequantize()
    return init
