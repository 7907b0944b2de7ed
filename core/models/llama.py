"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GGUFs), as llama.cpp's `llama` graph.

x = embd[tok]; per layer: x += Wo(attn(rope_norm(Wq a), rope_norm(Wk a), Wv a)) with a = rms(x);
x += down(silu(gate(f)) * up(f)) with f = rms(x); logits = output(rms(x)).
RoPE is NORM (adjacent pairs): llama.cpp's converter permutes the Q/K rows so that this equals HF's
rotate-half on the original weights. The head is tied to the embedding when `output.weight` is absent.
"""

from __future__ import annotations

import torch

from llmkit.core.archs.llama import LINEARS, NORMS, Config, block_plan, tensor_specs
from llmkit.core.models.common import DecoderLM, Embedding, StepBlock, load_block_weights
from llmkit.core.models.nextn import NextNHeads
from llmkit.kernels import ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.rope import ROPE_NORM
from llmkit.quant.tensor import QTensor

__all__ = ["LINEARS", "NORMS", "Block", "Config", "Model", "tensor_specs"]


class Block(StepBlock):
    """One llama block; `w` holds the weights under the LINEARS / NORMS names (loaded from the
    GGUF, or the trainer's differentiable modules)."""

    def __init__(self, c: Config, il: int, w, rope_factors: torch.Tensor | None = None):
        self.c, self.il, self.w = c, il, w
        self.rope = (c.n_rot, c.rope_base, c.freq_scale, rope_factors)
        self.nq, self.nkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self._rows: dict = {}  # (thread, rows) -> step buffers (common.row_scratch)

    def qkv(self, x: torch.Tensor, rope) -> tuple:
        """Attention inputs on rows x [T, H]: (q, k, v, scale) with q and k roped."""
        c, w, T = self.c, self.w, x.shape[0]
        qkv = ops.linear(w.wqkv, x, norm=(w.attn_norm, c.eps))  # [T, (Hq + 2 Hkv) * D]
        # rotate q and k heads in one call, in place: [T, Hq + Hkv, D]
        qk = qkv[:, : self.nq + self.nkv].view(T, -1, c.head_dim)
        qk = ops.rope(qk, *rope, ROPE_NORM, inplace=True)
        v = qkv[:, self.nq + self.nkv :].view(T, c.n_head_kv, c.head_dim)
        return qk[:, : c.n_head], qk[:, c.n_head :], v, c.scale

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest after attention (o [T, Hq * D]): output projection, FFN, residuals."""
        c, w = self.c, self.w
        x = ops.linear(w.wo, o, residual=x)
        h = ops.linear(w.w_gate_up, x, norm=(w.ffn_norm, c.eps))
        return ops.linear(w.w_down, h, glu_act="silu", residual=x)

    def _scratch(self, m: int) -> tuple:
        """An m-row step's state (common.row_scratch): buffers and the calls bound to them."""
        c, w = self.c, self.w
        qkv = torch.empty(m, self.nq + 2 * self.nkv, dtype=torch.float32)
        heads = qkv.view(m, -1, c.head_dim)
        q, k, v = heads.split((c.n_head, c.n_head_kv, c.n_head_kv), dim=1)
        h = torch.empty(m, w.w_gate_up.out_features, dtype=torch.float32)
        return (
            ops.linear_site(w.wqkv, norm=(w.attn_norm, c.eps)), qkv,
            ops.rope_site(heads[:, : c.n_head + c.n_head_kv], ROPE_NORM), q, k, v,
            ops.linear_site(w.wo), ops.linear_site(w.w_gate_up, norm=(w.ffn_norm, c.eps)), h,
            ops.linear_site(w.w_down, glu_act="silu"),
            ops.block_site(m, (w.wqkv, w.wo, w.w_gate_up, w.w_down),
                           (w.attn_norm, None, w.ffn_norm, None), c.eps, "silu",
                           block_plan(c, self.il).shape),
        )  # fmt: skip

    def __call__(self, x: torch.Tensor, rope, att) -> torch.Tensor:
        s = self.step_state(x)
        if s is None:
            return self.finish(x, att.attend(self.il, *self.qkv(x, rope)))
        # few rows on the native CPU path: the whole block in one native call when the cache is
        # the native contiguous one, else the projection and the GLU input go to this block's
        # buffers, q and k are roped in place; the same kernels as finish(x, attend(qkv(x)))
        wqkv, qkv, rope_qk, q, k, v, wo, gate_up, h, down, whole = s
        step = att.native_step(self.il)
        if step is not None:
            return whole(x, *rope, *step)
        wqkv(x, out=qkv)
        rope_qk(*rope)
        o = att.attend(self.il, q, k, v, self.c.scale)
        if o.dtype != torch.float32 or not o.is_contiguous():  # another cache's attention
            o = o.float().contiguous()
        x = wo(o, residual=x)
        return down(gate_up(x, out=h), residual=x)


class Model(DecoderLM):
    def __init__(self, c: Config, tensors: dict[str, QTensor], backend: Backend, mtp: bool = False):
        rf = tensors.get("rope_freqs.weight")
        self.rope_factors = rf.dequantize() if rf is not None else None
        self.build(c, tensors, backend, Embedding(tensors["token_embd.weight"]))
        self.mtp = NextNHeads(self) if mtp else None

    def load_block(self, il: int) -> Block:
        return self.block(il, load_block_weights(self.tensors, il, self.backend, LINEARS, NORMS))

    def block(self, il: int, w) -> Block:
        """Block il over weights `w` (loaded, or the trainer's differentiable ones)."""
        return Block(self.config, il, w, self.rope_factors)
