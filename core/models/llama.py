"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GGUFs), as llama.cpp's `llama` graph.

x = embd[tok]; per layer: x += Wo(attn(rope_norm(Wq a), rope_norm(Wk a), Wv a)) with a = rms(x);
x += down(silu(gate(f)) * up(f)) with f = rms(x); logits = output(rms(x)).
RoPE is NORM (adjacent pairs): llama.cpp's converter permutes the Q/K rows so that this equals HF's
rotate-half on the original weights. The head is tied to the embedding when `output.weight` is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.core.cache.kv import KVCache, LayerKV
from llmkit.core.layers import ROPE_NORM, add_rms_norm, apply_rope, glu, rms_norm, rope_cache
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
from llmkit.errors import LlmkitError
from llmkit.kernels.dispatch import Backend, make_linear
from llmkit.quant.tensor import QTensor


@dataclass
class Config:
    n_vocab: int
    n_embd: int = gguf("embedding_length")
    n_layer: int = gguf("block_count")
    n_ff: int = gguf("feed_forward_length")
    n_head: int = gguf("attention.head_count")
    n_head_kv: int | None = gguf("attention.head_count_kv", None)
    head_dim: int | None = gguf("attention.key_length", None)
    n_rot: int | None = gguf("rope.dimension_count", None)
    rope_base: float = gguf("rope.freq_base", 10000.0)
    rope_scaling: str | None = gguf("rope.scaling.type", None)
    rope_factor: float | None = gguf("rope.scaling.factor", None)
    eps: float = gguf("attention.layer_norm_rms_epsilon", 1e-5)
    attn_scale: float | None = gguf("attention.scale", None)
    n_nextn: int = gguf("nextn_predict_layers", 0)  # trailing NextN (MTP) blocks
    n_ctx_train: int = gguf("context_length", 4096)

    def __post_init__(self):
        split_layers(self, "llama")  # n_layer = trunk layers from here on
        for name in ("n_head", "n_head_kv"):
            v = getattr(self, name)
            if isinstance(v, list):  # per-layer arrays: only uniform ones are supported here
                if len(set(v)) != 1:
                    raise LlmkitError(
                        f"llama: per-layer {name} values {sorted(set(v))} are not supported"
                    )
                setattr(self, name, v[0])
        self.n_head_kv = self.n_head_kv or self.n_head
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


def tensor_specs(c: Config, part: str = "trunk", names=()) -> list[TensorSpec]:
    """Trunk tensors, or (part="mtp") the NextN blocks (core/models/nextn_dense.py)."""
    if part == "mtp":
        return nextn_specs(tensor_specs, c)
    H, D = c.n_embd, c.head_dim
    specs = [
        TensorSpec("token_embd.weight", (c.n_vocab, H)),
        TensorSpec("output_norm.weight", (H,)),
        TensorSpec("output.weight", (c.n_vocab, H), optional=True),
        TensorSpec("rope_freqs.weight", (c.n_rot // 2,), optional=True),
    ]
    for i in range(c.n_layer):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (H,)),
            TensorSpec(b + "attn_q.weight", (c.n_head * D, H)),
            TensorSpec(b + "attn_k.weight", (c.n_head_kv * D, H)),
            TensorSpec(b + "attn_v.weight", (c.n_head_kv * D, H)),
            TensorSpec(b + "attn_output.weight", (H, c.n_head * D)),
            TensorSpec(b + "ffn_norm.weight", (H,)),
            TensorSpec(b + "ffn_gate.weight", (c.n_ff, H)),
            TensorSpec(b + "ffn_up.weight", (c.n_ff, H)),
            TensorSpec(b + "ffn_down.weight", (H, c.n_ff)),
        ]
    return specs


class Layer:
    def __init__(self, c: Config, t: dict[str, QTensor], i: int, backend: Backend):
        b = f"blk.{i}."
        self.attn_norm = t[b + "attn_norm.weight"].dequantize()
        self.ffn_norm = t[b + "ffn_norm.weight"].dequantize()
        self.wqkv = make_linear(
            backend, t[b + "attn_q.weight"], t[b + "attn_k.weight"], t[b + "attn_v.weight"]
        )
        self.wo = make_linear(backend, t[b + "attn_output.weight"])
        self.w_gate_up = make_linear(backend, t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"])
        self.w_down = make_linear(backend, t[b + "ffn_down.weight"])


class Model(DenseNextN):
    nextn_kind = "llama"

    def __init__(self, c: Config, tensors: dict[str, QTensor], backend: Backend, mtp: bool = False):
        self.config, self.tensors, self.backend = c, tensors, backend
        self.embed = Embedding(tensors["token_embd.weight"])
        self.layers = [Layer(c, tensors, i, backend) for i in range(c.n_layer)]
        self.output_norm = tensors["output_norm.weight"].dequantize()
        self.output = lm_head(backend, tensors)
        rf = tensors.get("rope_freqs.weight")
        self.rope_factors = rf.dequantize() if rf is not None else None
        self.heads = build_heads(self, Layer, mtp)  # NextN blocks, only with --mtp

    def kv_layout(self) -> dict[int, LayerKV]:
        c = self.config
        return {i: LayerKV(c.n_head_kv, c.head_dim, c.head_dim) for i in range(c.n_layer)}

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, logits: str = "last", hidden: bool = False
    ):
        """tokens [T] -> logits [n, V] fp32; with hidden=True also the pre-norm hidden [T, H].
        logits=None: no LM head (the caller applies `lm_logits` to the rows it needs)."""
        c = self.config
        T = tokens.numel()
        pos = cache.positions(T)
        cache.begin(pos)
        cos, sin = rope_cache(pos, c.n_rot, c.rope_base, c.freq_scale, self.rope_factors)
        nq, nkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        x = self.embed(tokens)  # [T, H]
        for i, L in enumerate(self.layers):
            a = rms_norm(x, L.attn_norm, c.eps)
            qkv = L.wqkv(a)  # [T, (Hq + 2 Hkv) * D]
            # rotate q and k heads in one call: [T, Hq + Hkv, D]
            qk = apply_rope(qkv[:, : nq + nkv].view(T, -1, c.head_dim), cos, sin, ROPE_NORM)
            q, k = qk[:, : c.n_head], qk[:, c.n_head :]
            K, V, mask = cache.update(i, k, qkv[:, nq + nkv :].view(T, c.n_head_kv, c.head_dim))
            x, f = add_rms_norm(x, L.wo(cache.attention(q, K, V, mask, c.scale)), L.ffn_norm, c.eps)
            x = x + L.w_down(glu(L.w_gate_up(f), "silu"))
        out = None if logits is None else self.lm_logits(select_rows(x, logits))
        return (out, x) if hidden else out

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden rows x [n, H] -> logits [n, V] fp32 (output norm and LM head)."""
        return head_logits(self.config, self.output, self.output_norm, x)
