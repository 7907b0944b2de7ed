"""Gemma 3 text decoder with interleaved sliding-window attention, as llama.cpp's `gemma3` graph.

x = embd[tok] * sqrt(n_embd); per layer: a = rms(x); q/k per-head RMSNorm, NEOX rope (sliding layers:
base 10000, scale 1; global layers: the file's base and linear scaling); q *= 1/sqrt(head_dim);
o = rms(Wo(attn)) (post-attention norm); x += o; y = rms(down(gelu_tanh(gate(f)) * up(f))) with
f = rms(x) (post-FFW norm); x += y. Logits = tied head on rms(x). Layer il slides over the last
`sliding_window` tokens iff il % 6 < 5 (5 local layers, then 1 global). GGUF norms include the +1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmkit.core.cache.layout import LayerKV
from llmkit.core.model.config import MAX_DIM, MAX_HEAD_DIM, ModelConfig, gguf
from llmkit.core.model.weights import TensorSpec
from llmkit.core.models.common import (
    DecoderLM,
    Embedding,
    StepBlock,
    block_specs,
    load_block_weights,
    trunk_specs,
)
from llmkit.core.models.nextn import NextNHeads, nextn_specs
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.rope import ROPE_NEOX
from llmkit.quant.tensor import QTensor

SWA_PERIOD = 6  # llama.cpp: set_swa_pattern(6): layers 5, 11, 17, ... are global
# Block weights as data: attribute -> the GGUF tensors it fuses along the output dim / norm name
LINEARS = {
    "wqkv": ("attn_q", "attn_k", "attn_v"),
    "wo": ("attn_output",),
    "w_gate_up": ("ffn_gate", "ffn_up"),
    "w_down": ("ffn_down",),
}
NORMS = {
    "attn_norm": "attn_norm",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm",
    "ffn_norm": "ffn_norm",
    "post_ffw_norm": "post_ffw_norm",
}


@dataclass(kw_only=True)
class Config(ModelConfig):
    eps: float = gguf("attention.layer_norm_rms_epsilon", 1e-6, above=0.0, at_most=1.0)
    n_ctx_train: int = gguf("context_length", 32768, at_least=1, at_most=1 << 30)
    softcap: float = gguf("final_logit_softcapping", 0.0, at_least=0.0)
    n_ff: int = gguf("feed_forward_length", at_least=1, at_most=MAX_DIM)
    n_head: int = gguf("attention.head_count", at_least=1, at_most=MAX_DIM)
    n_head_kv: int = gguf("attention.head_count_kv", at_least=1, at_most=MAX_DIM)
    head_dim: int = gguf("attention.key_length", at_least=1, at_most=MAX_HEAD_DIM)
    head_dim_v: int | None = gguf("attention.value_length", None, at_least=1, at_most=MAX_HEAD_DIM)
    rope_base: float = gguf("rope.freq_base", 1e6, above=0.0)
    rope_base_swa: float = gguf("rope.freq_base_swa", 10000.0, above=0.0)
    rope_scaling: str | None = gguf("rope.scaling.type", None)
    rope_factor: float | None = gguf("rope.scaling.factor", None, above=0.0)
    sliding_window: int = gguf("attention.sliding_window", 0, at_least=0, at_most=1 << 30)

    def __post_init__(self):
        super().__post_init__()
        if self.n_head % self.n_head_kv:
            raise LlmkitError(
                f"gemma3: {self.n_head} query heads do not divide into {self.n_head_kv} kv heads"
            )
        self.head_dim_v = self.head_dim_v or self.head_dim
        self.freq_scale = 1.0 / self.rope_factor if self.rope_factor else 1.0
        # llama.cpp: 27B (62 layers) scales queries by 1/sqrt(n_embd/n_head), the others by 1/sqrt(head_dim)
        self.q_scale = (
            1.0 / math.sqrt(self.n_embd / self.n_head)
            if self.n_layer == 62
            else self.head_dim**-0.5
        )

    def is_swa(self, il: int) -> bool:
        return self.sliding_window > 0 and il % SWA_PERIOD < SWA_PERIOD - 1

    def layer_kv(self, il: int) -> LayerKV:
        window = self.sliding_window if self.is_swa(il) else None
        return LayerKV(self.n_head_kv, self.head_dim, self.head_dim_v, window)


def _shape(c: Config, name: str) -> tuple[int, ...]:
    H, D, Dv = c.n_embd, c.head_dim, c.head_dim_v
    return {
        "attn_q": (c.n_head * D, H),
        "attn_k": (c.n_head_kv * D, H),
        "attn_v": (c.n_head_kv * Dv, H),
        "attn_output": (H, c.n_head * Dv),
        "ffn_gate": (c.n_ff, H),
        "ffn_up": (c.n_ff, H),
        "ffn_down": (H, c.n_ff),
        "attn_q_norm": (D,),
        "attn_k_norm": (D,),
    }.get(name, (H,))  # the other norms


def tensor_specs(c: Config, part: str = "trunk", names=()) -> list[TensorSpec]:
    """Trunk tensors, or (part="mtp") the NextN blocks (core/models/nextn.py)."""
    specs_of = lambda il: block_specs(c, il, LINEARS, NORMS, _shape)  # noqa: E731
    if part == "mtp":
        return nextn_specs(c, specs_of)
    return trunk_specs(c, specs_of, ())


class Block(StepBlock):
    """One Gemma 3 block; `w` holds the weights under the LINEARS / NORMS names (loaded from the
    GGUF, or the trainer's differentiable modules)."""

    def __init__(self, c: Config, il: int, w):
        self.c, self.il, self.w = c, il, w
        swa = c.is_swa(il)
        self.rope = (
            c.head_dim,
            c.rope_base_swa if swa else c.rope_base,
            1.0 if swa else c.freq_scale,
            None,
        )
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
                           ops.BlockShape(c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v,
                                          c.head_dim, True, (w.q_norm, c.eps), (w.k_norm, c.eps),
                                          c.q_scale)),
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
        embed = Embedding(tensors["token_embd.weight"], scale=math.sqrt(c.n_embd))
        self.build(c, tensors, backend, embed)
        self.mtp = NextNHeads(self) if mtp else None

    def load_block(self, il: int) -> Block:
        return self.block(il, load_block_weights(self.tensors, il, self.backend, LINEARS, NORMS))

    def block(self, il: int, w) -> Block:
        """Block il over weights `w` (loaded, or the trainer's differentiable ones)."""
        return Block(self.config, il, w)
