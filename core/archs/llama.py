"""Llama-family decoder as data (Llama 2/3, SmolLM2, Mistral-style GGUFs): the config read from
GGUF metadata, the tensor table and the native block plan; the torch graph is
core/models/llama.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.core.archs import BlockPlan
from llmkit.core.cache.layout import LayerKV
from llmkit.core.model.config import MAX_DIM, MAX_HEAD_DIM, ModelConfig, gguf
from llmkit.core.model.specs import TensorSpec, block_specs, nextn_specs, trunk_specs
from llmkit.errors import LlmkitError
from llmkit.kernels.native_bind import BlockShape

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


def shape(c: Config, name: str) -> tuple[int, ...]:
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
    specs_of = lambda il: block_specs(c, il, LINEARS, NORMS, shape)  # noqa: E731
    if part == "mtp":
        return nextn_specs(c, specs_of)
    return trunk_specs(
        c, specs_of, (TensorSpec("rope_freqs.weight", (c.n_rot // 2,), optional=True),)
    )


def block_plan(c: Config, il: int) -> BlockPlan:
    """Block il as the native whole-block call runs it (NORM RoPE, SiLU GLU, no post-norms)."""
    rope = (c.n_rot, c.rope_base, c.freq_scale, "rope_freqs")
    shape = BlockShape(c.n_head, c.n_head_kv, c.head_dim, c.head_dim, c.n_rot, False,
                       attn_scale=c.scale)  # fmt: skip
    return BlockPlan(shape, rope, "silu", ("attn_norm", None, "ffn_norm", None))


def embed_scale(c: Config) -> float:
    """What the token embedding rows are multiplied by (0: not scaled)."""
    return 0.0
