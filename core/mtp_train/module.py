"""The trainable NextN block: fp32 `nn.Parameter`s under the attribute names of the architecture's
block weight table (its LINEARS and NORMS), so the architecture's own `Block` math runs on it with
autograd: `arch.Block(c, il, train_block)`.

Initialisation (why): the block body starts as a copy of the trunk's last layer (a working decoder
block for this residual stream), eh_proj as [0.01 * noise | I] scaled to the trunk hidden's typical
RMS (so x0 starts close to h_{p-1} itself), enorm/hnorm at 1 and shared_head_norm at the trunk's
output_norm: at step 0 the head already predicts roughly what the trunk's last layer would.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.core.models.nextn import NEXTN_NORMS


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


class TrainBlock(nn.Module):
    """One NextN block (block body + eh_proj, enorm, hnorm, shared_head_norm) in fp32. `arch` is
    the architecture module (its LINEARS / NORMS tables name the weights)."""

    def __init__(self, arch, init: dict[str, torch.Tensor]):
        super().__init__()
        self.linears, self.norms = arch.LINEARS, arch.NORMS
        # rows of each GGUF part inside a fused linear, to split it back on export
        self.split = {a: [init[p].shape[0] for p in parts] for a, parts in self.linears.items()}
        for a, parts in self.linears.items():
            setattr(self, a, _linear(torch.cat([init[p] for p in parts])))
        self.eh_proj = _linear(init["eh_proj"])
        for n in (*self.norms, *NEXTN_NORMS):
            setattr(self, n, nn.Parameter(init[n].clone().float()))

    def gguf_tensors(self, il: int) -> dict[str, torch.Tensor]:
        """The block's tensors under their GGUF names (fp32, numpy-order shapes)."""
        b = f"blk.{il}."
        out = {b + "nextn.eh_proj.weight": self.eh_proj.weight.detach()}
        for a, parts in self.linears.items():
            w = getattr(self, a).weight.detach().split(self.split[a])
            out |= {b + p + ".weight": t for p, t in zip(parts, w, strict=True)}
        for a, name in self.norms.items():
            out[b + name + ".weight"] = getattr(self, a).detach()
        for n in NEXTN_NORMS:
            out[b + f"nextn.{n}.weight"] = getattr(self, n).detach()
        return {k: t.contiguous().clone() for k, t in out.items()}


def init_from_trunk(arch, c, tensors, h_rms: float, gen: torch.Generator) -> dict:
    """Initial weights for a NextN block from the trunk's last layer (see the module docstring):
    GGUF part names for the linears, attribute names for the norms."""
    b = f"blk.{c.n_layer - 1}."
    parts = [p for ps in arch.LINEARS.values() for p in ps]
    init = {p: tensors[b + p + ".weight"].dequantize() for p in parts}
    for a, name in arch.NORMS.items():
        init[a] = tensors[b + name + ".weight"].dequantize()
    H = c.n_embd
    e_part = torch.randn(H, H, generator=gen) * (0.01 / H**0.5)
    init["eh_proj"] = torch.cat((e_part, torch.eye(H) * h_rms), dim=1)
    init["enorm"] = torch.ones(H)
    init["hnorm"] = torch.ones(H)
    init["shared_head_norm"] = tensors["output_norm.weight"].dequantize()
    return init


def init_from_head(arch, c, tensors, j: int) -> dict:
    """Initial weights from an existing NextN block j (a trained head, to train on further: new
    data, or the trunk's numerics after a kernel change): `tensors` of the base loaded with that
    head, so block j sits at layer n_layer + j."""
    b = f"blk.{c.n_layer + j}."
    parts = [p for ps in arch.LINEARS.values() for p in ps]
    init = {p: tensors[b + p + ".weight"].dequantize() for p in parts}
    for a, name in arch.NORMS.items():
        init[a] = tensors[b + name + ".weight"].dequantize()
    for n in ("eh_proj", "enorm", "hnorm"):
        init[n] = tensors[b + f"nextn.{n}.weight"].dequantize()
    shn = tensors.get(b + "nextn.shared_head_norm.weight") or tensors["output_norm.weight"]
    init["shared_head_norm"] = shn.dequantize()
    return init
