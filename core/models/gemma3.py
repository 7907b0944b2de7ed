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

from llmkit.core.cache.kv import KVCache, LayerKV
from llmkit.core.layers import ROPE_NEOX, add_rms_norm, apply_rope, glu, rms_norm, rope_cache
from llmkit.core.model.config import gguf
from llmkit.core.model.weights import TensorSpec
from llmkit.core.models.common import Embedding, lm_head, select_rows
from llmkit.core.models.nextn_dense import (
    DenseNextN,
    build_heads,
    head_logits,
    ignore_prefixes,  # noqa: F401  (the loader's MTP contract)
    nextn_specs,
    split_layers,
)
from llmkit.kernels.dispatch import Backend, make_linear
from llmkit.quant.tensor import QTensor

SWA_PERIOD = 6  # llama.cpp: set_swa_pattern(6): layers 5, 11, 17, ... are global


@dataclass
class Config:
    n_vocab: int
    n_embd: int = gguf("embedding_length")
    n_layer: int = gguf("block_count")
    n_ff: int = gguf("feed_forward_length")
    n_head: int = gguf("attention.head_count")
    n_head_kv: int = gguf("attention.head_count_kv")
    head_dim: int = gguf("attention.key_length")
    head_dim_v: int | None = gguf("attention.value_length", None)
    eps: float = gguf("attention.layer_norm_rms_epsilon", 1e-6)
    rope_base: float = gguf("rope.freq_base", 1e6)
    rope_base_swa: float = gguf("rope.freq_base_swa", 10000.0)
    rope_scaling: str | None = gguf("rope.scaling.type", None)
    rope_factor: float | None = gguf("rope.scaling.factor", None)
    sliding_window: int = gguf("attention.sliding_window", 0)
    softcap: float = gguf("final_logit_softcapping", 0.0)
    n_nextn: int = gguf("nextn_predict_layers", 0)  # trailing NextN (MTP) blocks
    n_ctx_train: int = gguf("context_length", 32768)

    def __post_init__(self):
        split_layers(self, "gemma3")  # n_layer = trunk layers from here on
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


def tensor_specs(c: Config, part: str = "trunk", names=()) -> list[TensorSpec]:
    """Trunk tensors, or (part="mtp") the NextN blocks (core/models/nextn_dense.py)."""
    if part == "mtp":
        return nextn_specs(tensor_specs, c)
    H, D, Dv = c.n_embd, c.head_dim, c.head_dim_v
    specs = [
        TensorSpec("token_embd.weight", (c.n_vocab, H)),
        TensorSpec("output_norm.weight", (H,)),
        TensorSpec("output.weight", (c.n_vocab, H), optional=True),
    ]
    for i in range(c.n_layer):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (H,)),
            TensorSpec(b + "attn_q.weight", (c.n_head * D, H)),
            TensorSpec(b + "attn_k.weight", (c.n_head_kv * D, H)),
            TensorSpec(b + "attn_v.weight", (c.n_head_kv * Dv, H)),
            TensorSpec(b + "attn_q_norm.weight", (D,)),
            TensorSpec(b + "attn_k_norm.weight", (D,)),
            TensorSpec(b + "attn_output.weight", (H, c.n_head * Dv)),
            TensorSpec(b + "post_attention_norm.weight", (H,)),
            TensorSpec(b + "ffn_norm.weight", (H,)),
            TensorSpec(b + "ffn_gate.weight", (c.n_ff, H)),
            TensorSpec(b + "ffn_up.weight", (c.n_ff, H)),
            TensorSpec(b + "ffn_down.weight", (H, c.n_ff)),
            TensorSpec(b + "post_ffw_norm.weight", (H,)),
        ]
    return specs


class Layer:
    def __init__(self, c: Config, t: dict[str, QTensor], i: int, backend: Backend):
        b = f"blk.{i}."
        norm = {
            n: t[b + n + ".weight"].dequantize()
            for n in (
                "attn_norm",
                "attn_q_norm",
                "attn_k_norm",
                "post_attention_norm",
                "ffn_norm",
                "post_ffw_norm",
            )
        }
        self.attn_norm, self.q_norm, self.k_norm = (
            norm["attn_norm"],
            norm["attn_q_norm"],
            norm["attn_k_norm"],
        )
        self.post_attn_norm, self.ffn_norm = norm["post_attention_norm"], norm["ffn_norm"]
        self.post_ffw_norm = norm["post_ffw_norm"]
        self.wqkv = make_linear(
            backend, t[b + "attn_q.weight"], t[b + "attn_k.weight"], t[b + "attn_v.weight"]
        )
        self.wo = make_linear(backend, t[b + "attn_output.weight"])
        self.w_gate_up = make_linear(backend, t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"])
        self.w_down = make_linear(backend, t[b + "ffn_down.weight"])
        self.swa = c.is_swa(i)
        self.rope_base = c.rope_base_swa if self.swa else c.rope_base
        self.freq_scale = 1.0 if self.swa else c.freq_scale


class Model(DenseNextN):
    nextn_kind = "gemma3"

    def __init__(self, c: Config, tensors: dict[str, QTensor], backend: Backend, mtp: bool = False):
        self.config, self.tensors, self.backend = c, tensors, backend
        self.embed = Embedding(tensors["token_embd.weight"], scale=math.sqrt(c.n_embd))
        self.layers = [Layer(c, tensors, i, backend) for i in range(c.n_layer)]
        self.output_norm = tensors["output_norm.weight"].dequantize()
        self.output = lm_head(backend, tensors)
        self.heads = build_heads(self, Layer, mtp)  # NextN blocks, only with --mtp

    def kv_layout(self) -> dict[int, LayerKV]:
        c = self.config
        return {
            i: LayerKV(
                c.n_head_kv, c.head_dim, c.head_dim_v, c.sliding_window if c.is_swa(i) else None
            )
            for i in range(c.n_layer)
        }

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, logits: str = "last", hidden: bool = False
    ):
        """tokens [T] -> logits [n, V] fp32; with hidden=True also the pre-norm hidden [T, H].
        logits=None: no LM head (the caller applies `lm_logits` to the rows it needs)."""
        c = self.config
        T = tokens.numel()
        pos = cache.positions(T)
        cache.begin(pos)
        ropes = {}  # (base, scale) -> (cos, sin): two kinds of layer, computed once per batch
        nq, nkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        x = self.embed(tokens)  # [T, H]
        for i, L in enumerate(self.layers):
            key = (L.rope_base, L.freq_scale)
            if key not in ropes:
                ropes[key] = rope_cache(pos, c.head_dim, L.rope_base, L.freq_scale)
            cos, sin = ropes[key]
            a = rms_norm(x, L.attn_norm, c.eps)
            q, k, v = L.wqkv(a).split((nq, nkv, c.n_head_kv * c.head_dim_v), dim=-1)
            q = rms_norm(q.view(T, c.n_head, c.head_dim), L.q_norm, c.eps)
            k = rms_norm(k.view(T, c.n_head_kv, c.head_dim), L.k_norm, c.eps)
            q = apply_rope(q, cos, sin, ROPE_NEOX) * c.q_scale
            k = apply_rope(k, cos, sin, ROPE_NEOX)
            K, V, mask = cache.update(i, k, v.view(T, c.n_head_kv, c.head_dim_v))
            o = L.wo(cache.attention(q, K, V, mask, 1.0))
            x, f = add_rms_norm(x, rms_norm(o, L.post_attn_norm, c.eps), L.ffn_norm, c.eps)
            y = L.w_down(glu(L.w_gate_up(f), "gelu_tanh"))
            x = x + rms_norm(y, L.post_ffw_norm, c.eps)
        out = None if logits is None else self.lm_logits(select_rows(x, logits))
        return (out, x) if hidden else out

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden rows x [n, H] -> logits [n, V] fp32 (output norm and LM head)."""
        return head_logits(self.config, self.output, self.output_norm, x)  # gemma: + soft-cap
