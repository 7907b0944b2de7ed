"""Gemma 3 text decoder with interleaved sliding-window attention, as llama.cpp's `gemma3` graph.

x = embd[tok] * sqrt(n_embd); per layer: a = rms(x); q/k per-head RMSNorm, NEOX rope (sliding layers:
base 10000, scale 1; global layers: the file's base and linear scaling); q *= 1/sqrt(head_dim);
o = rms(Wo(attn)) (post-attention norm); x += o; y = rms(down(gelu_tanh(gate(f)) * up(f))) with
f = rms(x) (post-FFW norm); x += y. Logits = tied head on rms(x). Layer il slides over the last
`sliding_window` tokens iff il % 6 < 5 (5 local layers, then 1 global). GGUF norms include the +1.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmkit.core.archs.gemma3 import (
    LINEARS,
    NORMS,
    SWA_PERIOD,
    Config,
    block_plan,
    embed_scale,
    rope_of,
    tensor_specs,
)
from llmkit.core.models.common import DecoderLM, Embedding, StepBlock, load_block_weights
from llmkit.core.models.nextn import NextNHeads
from llmkit.kernels import ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.rope import ROPE_NEOX
from llmkit.quant.tensor import QTensor

__all__ = ["LINEARS", "NORMS", "SWA_PERIOD", "Block", "Config", "Model", "tensor_specs"]


class Block(StepBlock):
    """One Gemma 3 block; `w` holds the weights under the LINEARS / NORMS names (loaded from the
    GGUF, or the trainer's differentiable modules)."""

    def __init__(self, c: Config, il: int, w):
        self.c, self.il, self.w = c, il, w
        self.rope = rope_of(c, il)
        self.split = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v)
        self._rows: dict = {}  # (thread, rows) -> step buffers (common.row_scratch)

    def qkv(self, x: torch.Tensor, rope) -> tuple:
        """Attention inputs on rows x [T, H]: (q, k, v, scale); q is pre-scaled, so scale = 1."""
        c, w, T = self.c, self.w, x.shape[0]
        q, k, v = ops.linear(w.wqkv, x, norm=(w.attn_norm, c.eps)).split(self.split, dim=-1)
        q, k = q.view(T, c.n_head, c.head_dim), k.view(T, c.n_head_kv, c.head_dim)
        # in place: q and k are views of the fresh projection
        q = ops.rope(q, *rope, ROPE_NEOX, (w.q_norm, c.eps), c.q_scale, inplace=True)
        k = ops.rope(k, *rope, ROPE_NEOX, (w.k_norm, c.eps), inplace=True)
        return q, k, v.view(T, c.n_head_kv, c.head_dim_v), 1.0

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest after attention (o [T, Hq * Dv]): output projection, FFN, norms, residuals."""
        c, w = self.c, self.w
        x = ops.linear(w.wo, o, post_norm=(w.post_attn_norm, c.eps), residual=x)
        h = ops.linear(w.w_gate_up, x, norm=(w.ffn_norm, c.eps))
        post = (w.post_ffw_norm, c.eps)
        return ops.linear(w.w_down, h, glu_act="gelu_tanh", post_norm=post, residual=x)

    def _scratch(self, m: int) -> tuple:
        """An m-row step's state (common.row_scratch): buffers and the calls bound to them."""
        c, w = self.c, self.w
        qkv = torch.empty(m, sum(self.split), dtype=torch.float32)
        q, k, v = qkv.split(self.split, dim=-1)
        q, k = q.view(m, c.n_head, c.head_dim), k.view(m, c.n_head_kv, c.head_dim)
        h = torch.empty(m, w.w_gate_up.out_features, dtype=torch.float32)
        return (
            ops.linear_site(w.wqkv, norm=(w.attn_norm, c.eps)), qkv,
            ops.rope_site(q, ROPE_NEOX, (w.q_norm, c.eps), c.q_scale),
            ops.rope_site(k, ROPE_NEOX, (w.k_norm, c.eps)),
            q, k, v.view(m, c.n_head_kv, c.head_dim_v),
            ops.linear_site(w.wo, post_norm=(w.post_attn_norm, c.eps)),
            ops.linear_site(w.w_gate_up, norm=(w.ffn_norm, c.eps)), h,
            ops.linear_site(w.w_down, glu_act="gelu_tanh", post_norm=(w.post_ffw_norm, c.eps)),
            ops.block_site(m, (w.wqkv, w.wo, w.w_gate_up, w.w_down),
                           (w.attn_norm, w.post_attn_norm, w.ffn_norm, w.post_ffw_norm), c.eps,
                           "gelu_tanh",
                           replace(block_plan(c, self.il).shape, q_norm=(w.q_norm, c.eps),
                                   k_norm=(w.k_norm, c.eps))),
        )  # fmt: skip

    def __call__(self, x: torch.Tensor, rope, att) -> torch.Tensor:
        s = self.step_state(x)
        if s is None:
            return self.finish(x, att.attend(self.il, *self.qkv(x, rope)))
        # few rows on the native CPU path: the whole block in one native call when the cache is
        # the native contiguous one, else the projection and the GLU input go to this block's
        # buffers, q and k are normed, roped (q scaled) in place; the same kernels as
        # finish(x, attend(qkv(x)))
        wqkv, qkv, rope_q, rope_k, q, k, v, wo, gate_up, h, down, whole = s
        step = att.native_step(self.il)
        if step is not None:
            return whole(x, *rope, *step)
        wqkv(x, out=qkv)
        rope_q(*rope)
        rope_k(*rope)
        o = att.attend(self.il, q, k, v, 1.0)
        if o.dtype != torch.float32 or not o.is_contiguous():  # another cache's attention
            o = o.float().contiguous()
        x = wo(o, residual=x)
        return down(gate_up(x, out=h), residual=x)


class Model(DecoderLM):
    def __init__(self, c: Config, tensors: dict[str, QTensor], backend: Backend, mtp: bool = False):
        embed = Embedding(tensors["token_embd.weight"], scale=embed_scale(c))
        self.build(c, tensors, backend, embed)
        self.mtp = NextNHeads(self) if mtp else None

    def load_block(self, il: int) -> Block:
        return self.block(il, load_block_weights(self.tensors, il, self.backend, LINEARS, NORMS))

    def block(self, il: int, w) -> Block:
        """Block il over weights `w` (loaded, or the trainer's differentiable ones)."""
        return Block(self.config, il, w)
