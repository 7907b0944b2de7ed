"""Step-3.5 / Step-3.7 Flash (`step35`): GQA decoder with interleaved sliding-window attention,
head-wise attention gates, routed MoE + shared expert, and NextN (MTP) draft blocks, as llama.cpp.

x = embd[tok]; per trunk layer il < n_layer: a = rms(x); q/k/v = W a; per-head rms(q), rms(k); NEOX
rope (full layers: the first rope.dimension_count/2 dims, rope.freq_base, rope_freqs factors; sliding
layers: all rope.dimension_count dims, rope.freq_base_swa, window sliding_window); o = attn(q,k,v)
* sigmoid(Wg a) per head; x += Wo o; f = rms(x); x += swiglu(f) (dense) or moe(f) + swiglu_sh(f)
(SwiGLU clamped where swiglu_clamp_* > 0); h = x (pre-norm, fed to NextN); logits = output(rms(h)).
NextN block il = n_layer + k (core/models/nextn.py): x0 = eh_proj [rms(embd[tok], enorm) | rms(h_prev, hnorm)]; one decoder
block il (its own kind); h_out = block output (pre-norm); logits = head(rms(h_out, shared_head_norm)).
A layer is MoE iff its router `blk.N.ffn_gate_inp.weight` is in the file (as llama.cpp decides).
Per-layer hparam arrays have block_count entries (trunk + NextN). GGUF norms include the +1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from llmkit.core.cache.layout import LayerKV
from llmkit.core.model.config import (
    MAX_DIM,
    MAX_HEAD_DIM,
    ModelConfig,
    MoEConfig,
    gguf,
    per_layer,
)  # fmt: skip
from llmkit.core.model.specs import nextn_specs, trunk_specs
from llmkit.core.model.weights import TensorSpec
from llmkit.core.models.common import DecoderLM, Embedding
from llmkit.core.models.moe import GATING_SIGMOID, GATING_SOFTMAX, RoutedExperts, swiglu
from llmkit.core.models.nextn import NextNHeads
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.rope import ROPE_NEOX
from llmkit.quant.tensor import QTensor


@dataclass(kw_only=True)
class Config(ModelConfig, MoEConfig):
    n_ctx_train: int = gguf("context_length", 262144, at_least=1, at_most=1 << 30)
    n_ff: int = gguf("feed_forward_length", at_least=1, at_most=MAX_DIM)
    n_head: int | list[int] = gguf(
        "attention.head_count", at_least=1, at_most=MAX_DIM
    )  # per-layer array or scalar
    n_head_kv: int | list[int] = gguf("attention.head_count_kv", at_least=1, at_most=MAX_DIM)
    head_dim: int = gguf("attention.key_length", at_least=1, at_most=MAX_HEAD_DIM)
    head_dim_v: int | None = gguf("attention.value_length", None, at_least=1, at_most=MAX_HEAD_DIM)
    sliding_window: int = gguf("attention.sliding_window", 0, at_least=0, at_most=1 << 30)
    swa_pattern: bool | list[bool] = gguf("attention.sliding_window_pattern", False)
    rope_base: float = gguf("rope.freq_base", 10000.0, above=0.0)
    rope_base_swa: float | None = gguf("rope.freq_base_swa", None, above=0.0)
    n_rot: int | None = gguf("rope.dimension_count", None, at_least=1, at_most=MAX_HEAD_DIM)
    rope_scaling: str | None = gguf("rope.scaling.type", None)
    rope_factor: float | None = gguf("rope.scaling.factor", None, above=0.0)
    n_expert: int = gguf("expert_count", 0, at_least=0, at_most=4096)
    n_expert_used: int = gguf("expert_used_count", 0, at_least=0, at_most=4096)
    n_ff_exp: int = gguf("expert_feed_forward_length", 0, at_least=0, at_most=MAX_DIM)
    n_ff_shexp: int = gguf("expert_shared_feed_forward_length", 0, at_least=0, at_most=MAX_DIM)
    expert_weights_norm: bool = gguf("expert_weights_norm", False)
    expert_weights_scale: float = gguf("expert_weights_scale", 0.0, at_least=0.0)
    expert_gating_func: int = gguf("expert_gating_func", GATING_SIGMOID)
    swiglu_clamp_exp: float | list[float] = gguf("swiglu_clamp_exp", 0.0)
    swiglu_clamp_shexp: float | list[float] = gguf("swiglu_clamp_shexp", 0.0)
    n_expert_used_override: int | None = None  # --moe-n-expert (set by the loader, not in GGUF)

    def __post_init__(self):
        super().__post_init__()
        n = self.n_layer_all  # per-layer arrays cover the trunk and the NextN blocks
        self.n_head = [int(v) for v in per_layer(self.n_head, n, "step35.attention.head_count")]
        self.n_head_kv = [
            int(v) for v in per_layer(self.n_head_kv, n, "step35.attention.head_count_kv")
        ]
        for il, (hq, hkv) in enumerate(zip(self.n_head, self.n_head_kv, strict=True)):
            if hkv <= 0 or hq % hkv:
                raise LlmkitError(f"step35: layer {il} has {hq} query heads for {hkv} kv heads")
        self.head_dim_v = self.head_dim_v or self.head_dim
        self.swa = [
            bool(v) for v in per_layer(self.swa_pattern, n, "step35.sliding_window_pattern")
        ]
        if any(self.swa) and self.sliding_window <= 0:
            raise LlmkitError("step35: sliding layers declared but attention.sliding_window is 0")
        # llama.cpp halves n_rot for full-attention layers (partial rotary 0.5); sliding rotate all
        self.n_rot = self.n_rot or self.head_dim
        if self.n_rot > self.head_dim or self.n_rot % 4:
            raise LlmkitError(
                f"step35: rope.dimension_count {self.n_rot} must be a multiple of 4 "
                f"and at most the head dim {self.head_dim}"
            )
        self.n_rot_full = self.n_rot // 2
        self.rope_base_swa = self.rope_base_swa or self.rope_base
        if self.rope_scaling not in (None, "none", "linear"):
            raise LlmkitError(f"step35: rope scaling type {self.rope_scaling} is not supported")
        self.freq_scale = 1.0 / self.rope_factor if self.rope_factor else 1.0  # full layers only
        self.swiglu_clamp_exp = [
            float(v) for v in per_layer(self.swiglu_clamp_exp, n, "step35.swiglu_clamp_exp")
        ]
        self.swiglu_clamp_shexp = [
            float(v) for v in per_layer(self.swiglu_clamp_shexp, n, "step35.swiglu_clamp_shexp")
        ]
        if self.expert_gating_func not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise LlmkitError(
                f"step35: expert_gating_func {self.expert_gating_func} is not supported "
                "(1 softmax, 2 sigmoid)"
            )
        if self.n_expert_used_override is not None:
            self.top_k()

    def layer_kv(self, il: int) -> LayerKV:
        window = self.sliding_window if self.swa[il] else None
        return LayerKV(self.n_head_kv[il], self.head_dim, self.head_dim_v, window)


def moe_layers(names: Iterable[str]) -> set[int]:
    """Block indices whose router `blk.N.ffn_gate_inp.weight` is among `names` (a file's tensors)."""
    out = set()
    for name in names:
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] == "ffn_gate_inp":
            out.add(int(parts[1]))
    return out


def tensor_specs(c: Config, part: str = "trunk", names: Iterable[str] = ()) -> list[TensorSpec]:
    """The tensors of `part` ("trunk": embedding, head and blocks < n_layer; "mtp": the NextN
    blocks, core/models/nextn.py). `names` = the file's tensor names: they decide which layers
    are MoE."""
    moe = moe_layers(names)
    specs_of = lambda il: _block_specs(c, il, il in moe)  # noqa: E731
    if part == "mtp":
        return nextn_specs(c, specs_of)
    return trunk_specs(
        c, specs_of, (TensorSpec("rope_freqs.weight", (c.n_rot // 2,), optional=True),)
    )


def _block_specs(c: Config, il: int, moe: bool) -> list[TensorSpec]:
    H, D, Dv = c.n_embd, c.head_dim, c.head_dim_v
    hq, hkv = c.n_head[il], c.n_head_kv[il]
    b = f"blk.{il}."
    specs = [
        TensorSpec(b + "attn_norm.weight", (H,)),
        TensorSpec(b + "attn_q.weight", (hq * D, H)),
        TensorSpec(b + "attn_k.weight", (hkv * D, H)),
        TensorSpec(b + "attn_v.weight", (hkv * Dv, H)),
        TensorSpec(b + "attn_q_norm.weight", (D,)),
        TensorSpec(b + "attn_k_norm.weight", (D,)),
        TensorSpec(b + "attn_gate.weight", (hq, H), optional=True),
        TensorSpec(b + "attn_output.weight", (H, hq * Dv)),
        TensorSpec(b + "ffn_norm.weight", (H,)),
    ]
    if not moe:
        return specs + [
            TensorSpec(b + "ffn_gate.weight", (c.n_ff, H)),
            TensorSpec(b + "ffn_up.weight", (c.n_ff, H)),
            TensorSpec(b + "ffn_down.weight", (H, c.n_ff)),
        ]
    if c.n_expert <= 0 or not 0 < c.n_expert_used <= c.n_expert:
        raise LlmkitError(
            f"step35: blk.{il} is MoE but expert_count {c.n_expert} / "
            f"expert_used_count {c.n_expert_used} are not set"
        )
    E, Fe, Fs = c.n_expert, c.n_ff_exp, c.n_ff_shexp
    return specs + [
        TensorSpec(b + "ffn_gate_inp.weight", (E, H)),
        TensorSpec(b + "exp_probs_b.bias", (E,), optional=True),
        TensorSpec(b + "ffn_gate_exps.weight", (E, Fe, H)),
        TensorSpec(b + "ffn_up_exps.weight", (E, Fe, H)),
        TensorSpec(b + "ffn_down_exps.weight", (E, H, Fe)),
        TensorSpec(b + "ffn_gate_shexp.weight", (Fs, H)),
        TensorSpec(b + "ffn_up_shexp.weight", (Fs, H)),
        TensorSpec(b + "ffn_down_shexp.weight", (H, Fs)),
    ]


class Block:
    """One step35 decoder block: a trunk layer, or the body of a NextN block."""

    def __init__(self, c: Config, t: dict[str, QTensor], il: int, backend: Backend, factors=None):
        b = f"blk.{il}."
        self.c, self.il, self.swa = c, il, c.swa[il]
        # two kinds of layer: sliding (all rope dims) and full (half the dims, factors, scaling)
        self.rope = (
            (c.n_rot, c.rope_base_swa, 1.0, None)
            if self.swa
            else (c.n_rot_full, c.rope_base, c.freq_scale, factors)
        )
        self.n_head, self.n_head_kv = c.n_head[il], c.n_head_kv[il]
        self.attn_norm = t[b + "attn_norm.weight"].dequantize()
        self.q_norm = t[b + "attn_q_norm.weight"].dequantize()
        self.k_norm = t[b + "attn_k_norm.weight"].dequantize()
        self.ffn_norm = t[b + "ffn_norm.weight"].dequantize()
        # q, k, v and the head gate all read the same normed input: one fused matmul
        gate = t.get(b + "attn_gate.weight")
        qkv = [t[b + n + ".weight"] for n in ("attn_q", "attn_k", "attn_v")]
        self.w_in = ops.make_linear(backend, *qkv, *([gate] if gate is not None else []))
        D, Dv = c.head_dim, c.head_dim_v
        self.split = [self.n_head * D, self.n_head_kv * D, self.n_head_kv * Dv]
        self.split += [self.n_head] if gate is not None else []
        self.wo = ops.make_linear(backend, t[b + "attn_output.weight"])
        self.limit_sh = c.swiglu_clamp_shexp[il]  # dense FFN and shared expert
        self.moe = None
        if b + "ffn_gate_inp.weight" in t:
            self.moe = _routed_experts(c, t, il, backend)
            ffn = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
        else:
            ffn = ("ffn_gate", "ffn_up", "ffn_down")
        self.w_gate_up = ops.make_linear(
            backend, t[b + ffn[0] + ".weight"], t[b + ffn[1] + ".weight"]
        )
        self.w_down = ops.make_linear(backend, t[b + ffn[2] + ".weight"])

    def native_site(self, x: torch.Tensor) -> None:
        return None  # its blocks (MoE, per-layer heads) run op by op

    def __call__(self, x: torch.Tensor, rope, att) -> torch.Tensor:
        c, T = self.c, x.shape[0]
        D, Dv = c.head_dim, c.head_dim_v
        q, k, v, *g = ops.linear(self.w_in, x, norm=(self.attn_norm, c.eps)).split(self.split, -1)
        # per-head norms before rope
        q = ops.rope(q.view(T, self.n_head, D), *rope, ROPE_NEOX, (self.q_norm, c.eps))
        k = ops.rope(k.view(T, self.n_head_kv, D), *rope, ROPE_NEOX, (self.k_norm, c.eps))
        o = att.attend(self.il, q, k, v.view(T, self.n_head_kv, Dv), D**-0.5)  # [T, Hq * Dv]
        if g:  # head-wise sigmoid gate: one scalar per head and token
            o = (o.view(T, self.n_head, Dv) * g[0].sigmoid()[..., None]).view(T, -1)
        x = ops.linear(self.wo, o, residual=x)
        f = ops.rms_norm(x, self.ffn_norm, c.eps)
        gate, up = self.w_gate_up(f).chunk(2, dim=-1)
        y = self.w_down(swiglu(gate, up, self.limit_sh))  # dense FFN or shared expert
        if self.moe is not None:
            y = y + self.moe(f, c.top_k())
        return x + y


def _routed_experts(c: Config, t: dict[str, QTensor], il: int, backend: Backend):
    b = f"blk.{il}."
    router = t[b + "ffn_gate_inp.weight"].dequantize()  # [E, H] fp32: routing stays exact
    backend.extra_bytes += router.numel() * router.element_size()
    bias = t.get(b + "exp_probs_b.bias")
    return RoutedExperts(
        router.to(backend.device),
        bias.dequantize().to(backend.device) if bias is not None else None,
        *(
            ops.make_expert_linear(backend, t[b + n + ".weight"])
            for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        ),
        gating=c.expert_gating_func,
        norm_weights=c.expert_weights_norm,
        scale=c.expert_weights_scale,
        limit=c.swiglu_clamp_exp[il],
    )


class Model(DecoderLM):
    # MoE routing reads the selected experts back to the host (one GEMV per expert in use), which
    # a CUDA graph cannot capture: decode steps stay eager (core/model/device.py)
    supports_cuda_graphs: ClassVar[bool] = False

    def __init__(self, c: Config, tensors: dict[str, QTensor], backend: Backend, mtp: bool = False):
        c.top_k()  # validates --moe-n-expert before any weight is prepared
        rf = tensors.get("rope_freqs.weight")
        self.rope_factors = rf.dequantize() if rf is not None else None
        self.build(c, tensors, backend, Embedding(tensors["token_embd.weight"]))
        self.mtp = NextNHeads(self) if mtp else None

    def load_block(self, il: int) -> Block:
        return Block(self.config, self.tensors, il, self.backend, self.rope_factors)
