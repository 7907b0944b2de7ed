"""Gemma 3 text decoder as data (interleaved sliding-window attention): the config read from GGUF
metadata, the tensor table and the native block plan; the torch graph is core/models/gemma3.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmkit.core.archs import BlockPlan
from llmkit.core.cache.layout import LayerKV
from llmkit.core.model.config import MAX_DIM, MAX_HEAD_DIM, ModelConfig, gguf
from llmkit.core.model.specs import TensorSpec, block_specs, nextn_specs, trunk_specs
from llmkit.errors import LlmkitError
from llmkit.kernels.native_bind import BlockShape

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


def shape(c: Config, name: str) -> tuple[int, ...]:
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
    specs_of = lambda il: block_specs(c, il, LINEARS, NORMS, shape)  # noqa: E731
    if part == "mtp":
        return nextn_specs(c, specs_of)
    return trunk_specs(c, specs_of, ())


def rope_of(c: Config, il: int) -> tuple:
    """Block il's RoPE table: sliding layers base rope_base_swa, unscaled; global ones the file's
    base and linear scaling (n_rot, base, freq_scale, factors)."""
    swa = c.is_swa(il)
    return (c.head_dim, c.rope_base_swa if swa else c.rope_base, 1.0 if swa else c.freq_scale, None)


def block_plan(c: Config, il: int) -> BlockPlan:
    """Block il as the native whole-block call runs it (NEOX RoPE after the per-head norms, the
    query scale folded into q, tanh-GELU GLU, post-norms after attention and FFN)."""
    shape = BlockShape(c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.head_dim, True,
                       q_scale=c.q_scale)  # fmt: skip
    return BlockPlan(shape, rope_of(c, il), "gelu_tanh",
                     ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
                     ("attn_q_norm", "attn_k_norm"))  # fmt: skip


def embed_scale(c: Config) -> float:
    """What the token embedding rows are multiplied by: sqrt(n_embd)."""
    return math.sqrt(c.n_embd)
