"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GGUFs), as llama.cpp's `llama` graph.

x = embd[tok]; per layer: x += Wo(attn(rope_norm(Wq a), rope_norm(Wk a), Wv a)) with a = rms(x);
x += down(silu(gate(f)) * up(f)) with f = rms(x); logits = output(rms(x)).
RoPE is NORM (adjacent pairs): llama.cpp's converter permutes the Q/K rows so that this equals HF's
rotate-half on the original weights. The head is tied to the embedding when `output.weight` is absent.
"""

from __future__ import annotations

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
from llmkit.kernels.rope import ROPE_NORM
from llmkit.quant.tensor import QTensor

# Block weights as data: attribute -> the GGUF tensors it fuses along the output dim / norm name
LINEARS = {
    "wqkv": ("attn_q", "attn_k", "attn_v"),
    "wo": ("attn_output",),
    "w_gate_up": ("ffn_gate", "ffn_up"),
    "w_down": ("ffn_down",),
}
NORMS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


@dataclass(kw_only=True)
class Config(ModelConfig):
    n_ff: int = gguf("feed_forward_length", at_least=1, at_most=MAX_DIM)
    n_head: int | list[int] = gguf("attention.head_count", at_least=1, at_most=MAX_DIM)
    n_head_kv: int | list[int] | None = gguf(
        "attention.head_count_kv", None, at_least=1, at_most=MAX_DIM
    )
    head_dim: int | None = gguf("attention.key_length", None, at_least=1, at_most=MAX_HEAD_DIM)
    n_rot: int | None = gguf("rope.dimension_count", None, at_least=1, at_most=MAX_HEAD_DIM)
    rope_base: float = gguf("rope.freq_base", 10000.0, above=0.0)
    rope_scaling: str | None = gguf("rope.scaling.type", None)
    rope_factor: float | None = gguf("rope.scaling.factor", None, above=0.0)
    attn_scale: float | None = gguf("attention.scale", None, above=0.0)

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_head", "n_head_kv"):
            v = getattr(self, name)
            if isinstance(v, list):  # per-layer arrays: only uniform ones are supported here
                if len(set(v)) != 1:
                    raise LlmkitError(
                        f"llama: per-layer {name} values {sorted(set(v))} are not supported"
                    )
                setattr(self, name, v[0])
        self.n_head_kv = self.n_head_kv or self.n_head
        if self.n_head % self.n_head_kv:
            raise LlmkitError(
                f"llama: {self.n_head} query heads do not divide into {self.n_head_kv} kv heads"
            )
        if self.head_dim is None and self.n_embd % self.n_head:
            raise LlmkitError(
                f"llama: embedding_length {self.n_embd} is not a multiple of {self.n_head} heads"
            )
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_rot = self.n_rot or self.head_dim
        if self.n_rot != self.head_dim:
            raise LlmkitError(
                f"llama: rope.dimension_count {self.n_rot} must equal head dim {self.head_dim}"
            )
        if self.rope_scaling not in (None, "none", "linear"):
            raise LlmkitError(f"llama: rope scaling type {self.rope_scaling} is not supported")
        self.freq_scale = (
            1.0 / self.rope_factor if self.rope_scaling == "linear" and self.rope_factor else 1.0
        )
        self.scale = self.attn_scale or self.head_dim**-0.5

    def layer_kv(self, il: int) -> LayerKV:
        return LayerKV(self.n_head_kv, self.head_dim, self.head_dim)


def _shape(c: Config, name: str) -> tuple[int, ...]:
    H, D = c.n_embd, c.head_dim
    return {
        "attn_q": (c.n_head * D, H),
        "attn_k": (c.n_head_kv * D, H),
        "attn_v": (c.n_head_kv * D, H),
        "attn_output": (H, c.n_head * D),
        "ffn_gate": (c.n_ff, H),
        "ffn_up": (c.n_ff, H),
        "ffn_down": (H, c.n_ff),
    }.get(name, (H,))  # norms


def tensor_specs(c: Config, part: str = "trunk", names=()) -> list[TensorSpec]:
    """Trunk tensors, or (part="mtp") the NextN blocks (core/models/nextn.py)."""
    specs_of = lambda il: block_specs(c, il, LINEARS, NORMS, _shape)  # noqa: E731
    if part == "mtp":
        return nextn_specs(c, specs_of)
    return trunk_specs(
        c, specs_of, (TensorSpec("rope_freqs.weight", (c.n_rot // 2,), optional=True),)
    )


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
                           ops.BlockShape(c.n_head, c.n_head_kv, c.head_dim, c.head_dim, c.n_rot,
                                          False, attn_scale=c.scale)),
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
