"""Gemma 4 text decoder, as llama.cpp's `gemma4` graph (dense and MoE blocks).

x0 = embd[tok] * sqrt(n_embd). Per layer il: a = rms(x); q = rope(qnorm(Wq a)); layers that own
KV: k = rope(knorm(Wk a)), v = rms_noweight(Wv a) (Wk a when attn_v is absent); attention scale
1.0. Sliding layers (`sliding_window_pattern`) use the SWA head dim, base `rope.freq_base_swa`
and their own KV-head count; full layers the full head dim, base `rope.freq_base` and the
`rope_freqs` factors (1 for rotated pairs, 1e30 for the rest: "proportional" partial RoPE). The
last `attention.shared_kv_layers` layers own no cache: they attend with Q only over the K/V of the
last KV-owning layer of their type. Then x += post_attn_norm(Wo o);
x += post_ffw_norm(down(gelu_tanh(gate f) * up f)) with f = ffn_norm(x); with per-layer
embeddings x += post_norm(proj(gelu_tanh(inp_gate x) * P_il)); finally x *= layer_output_scale.
P = (rms(W_pl x0 / sqrt(n_embd); per_layer_proj_norm) + E_pl[tok] * sqrt(d_pl)) / sqrt(2).
Logits: c * tanh(head(rms(x)) / c). GGUF norms are stored as is (no +1). MoE checkpoints
(`expert_count` > 0) add routed experts beside the dense FFN in every block (gemma4_moe.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

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
from llmkit.core.model.protocol import ForwardOutput, Rows
from llmkit.core.model.weights import TensorSpec
from llmkit.core.models.common import DecoderLM, Embedding, rope_rows, select_rows, token_ids
from llmkit.core.models.gemma4_moe import Gemma4Experts, moe_specs
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.rope import ROPE_NEOX
from llmkit.quant.tensor import QTensor

NORMS = {
    "attn_norm": "attn_norm",
    "q_norm": "attn_q_norm",
    "post_attn_norm": "post_attention_norm",
    "ffn_norm": "ffn_norm",
    "post_ffw_norm": "post_ffw_norm",
}


@dataclass(kw_only=True)
class Config(ModelConfig, MoEConfig):
    eps: float = gguf("attention.layer_norm_rms_epsilon", 1e-6, above=0.0, at_most=1.0)
    n_ctx_train: int = gguf("context_length", 131072, at_least=1, at_most=1 << 30)
    softcap: float = gguf("final_logit_softcapping", 0.0, at_least=0.0)
    n_ff: int | list[int] = gguf("feed_forward_length", at_least=1, at_most=MAX_DIM)
    n_head: int = gguf("attention.head_count", at_least=1, at_most=MAX_DIM)
    n_head_kv: int | list[int] = gguf("attention.head_count_kv", at_least=1, at_most=MAX_DIM)
    head_dim: int = gguf("attention.key_length", at_least=2, at_most=MAX_HEAD_DIM)
    head_dim_v: int | None = gguf("attention.value_length", None, at_least=1, at_most=MAX_HEAD_DIM)
    head_dim_swa: int = gguf("attention.key_length_swa", at_least=2, at_most=MAX_HEAD_DIM)
    head_dim_v_swa: int | None = gguf(
        "attention.value_length_swa", None, at_least=1, at_most=MAX_HEAD_DIM
    )
    rope_base: float = gguf("rope.freq_base", 1e6, above=0.0)
    rope_base_swa: float = gguf("rope.freq_base_swa", 10000.0, above=0.0)
    n_rot: int | None = gguf("rope.dimension_count", None, at_least=2, at_most=MAX_HEAD_DIM)
    n_rot_swa: int | None = gguf("rope.dimension_count_swa", None, at_least=2, at_most=MAX_HEAD_DIM)
    sliding_window: int = gguf("attention.sliding_window", 0, at_least=0, at_most=1 << 30)
    swa_pattern: bool | list[bool] = gguf("attention.sliding_window_pattern", False)
    n_kv_shared: int = gguf("attention.shared_kv_layers", 0, at_least=0, at_most=1 << 16)
    n_embd_pl: int = gguf("embedding_length_per_layer_input", 0, at_least=0, at_most=MAX_DIM)
    n_expert: int = gguf("expert_count", 0, at_least=0, at_most=1 << 16)
    n_expert_used: int = gguf("expert_used_count", 0, at_least=0, at_most=1 << 16)
    n_ff_exp: int = gguf("expert_feed_forward_length", 0, at_least=0, at_most=MAX_DIM)
    n_expert_used_override: int | None = None  # --moe-n-expert (set by the loader, not in GGUF)

    def __post_init__(self):
        super().__post_init__()
        L = self.n_layer
        a = self.__class__.__module__.rsplit(".", 1)[-1].replace("_", "-")
        if self.n_expert and not (0 < self.n_expert_used <= self.n_expert and self.n_ff_exp):
            raise LlmkitError(
                f"{a}: expert_count {self.n_expert} needs expert_used_count in 1..{self.n_expert} "
                f"(got {self.n_expert_used}) and expert_feed_forward_length (got {self.n_ff_exp})"
            )
        if self.n_expert_used_override is not None:
            self.top_k()
        self.head_dim_v = self.head_dim_v or self.head_dim
        self.head_dim_v_swa = self.head_dim_v_swa or self.head_dim_swa
        if (self.head_dim_v, self.head_dim_v_swa) != (self.head_dim, self.head_dim_swa):
            raise LlmkitError(f"{a}: K and V head sizes must match (per layer type)")
        self.n_rot = self.n_rot or self.head_dim
        self.n_rot_swa = self.n_rot_swa or self.head_dim_swa
        if self.n_rot > self.head_dim or self.n_rot_swa > self.head_dim_swa or self.n_rot % 2:
            raise LlmkitError(f"{a}: rope.dimension_count exceeds the head size or is odd")
        self.ff = per_layer(self.n_ff, L, f"{a}.feed_forward_length")
        self.kv_heads = per_layer(self.n_head_kv, L, f"{a}.attention.head_count_kv")
        self.swa = per_layer(self.swa_pattern, L, f"{a}.attention.sliding_window_pattern")
        if any(self.swa) and self.sliding_window < 1:
            raise LlmkitError(f"{a}: sliding layers but no attention.sliding_window")
        if self.n_kv_shared > L:
            raise LlmkitError(f"{a}: {self.n_kv_shared} KV-shared layers exceed {L} layers")
        for il in range(L):
            if self.n_head % self.kv_heads[il]:
                raise LlmkitError(
                    f"{a}: layer {il}: {self.n_head} query heads do not divide into "
                    f"{self.kv_heads[il]} kv heads"
                )
        self.n_kv_from_start = L - self.n_kv_shared
        self.kv_owner = [self._owner(il) for il in range(L)] if self.checks_owners else []

    checks_owners = True  # the assistant (all layers shared) reads another model's caches

    def _owner(self, il: int) -> int:
        """The layer whose cache layer il attends over: itself, or for a KV-shared layer the last
        KV-owning layer of the same type (transformers' and llama.cpp's rule)."""
        if il < self.n_kv_from_start:
            return il
        own = [j for j in range(self.n_kv_from_start) if self.swa[j] == self.swa[il]]
        if not own:
            kind = "sliding" if self.swa[il] else "full"
            raise LlmkitError(f"gemma4: KV-shared {kind} layer {il} has no {kind} layer to share")
        return own[-1]

    def hd(self, il: int) -> int:
        return self.head_dim_swa if self.swa[il] else self.head_dim

    def layer_kv(self, il: int) -> LayerKV:
        window = self.sliding_window if self.swa[il] else None
        return LayerKV(self.kv_heads[il], self.hd(il), self.hd(il), window)


def block_names(c: Config, il: int) -> list[TensorSpec]:
    """Block il's tensors: shared-KV layers have no attn_k / attn_v / attn_k_norm; attn_v is
    optional (V then reuses the K projection); per-layer-embedding blocks add three."""
    H, D, F, Hkv = c.n_embd, c.hd(il), c.ff[il], c.kv_heads[il]
    b = f"blk.{il}."
    specs = [
        TensorSpec(b + "attn_q.weight", (c.n_head * D, H)),
        TensorSpec(b + "attn_output.weight", (H, c.n_head * D)),
        TensorSpec(b + "attn_q_norm.weight", (D,)),
        TensorSpec(b + "ffn_gate.weight", (F, H)),
        TensorSpec(b + "ffn_up.weight", (F, H)),
        TensorSpec(b + "ffn_down.weight", (H, F)),
        TensorSpec(b + "layer_output_scale.weight", (1,)),
    ] + [TensorSpec(b + n + ".weight", (H,)) for n in NORMS.values() if n != "attn_q_norm"]
    if il < c.n_kv_from_start:
        specs += [
            TensorSpec(b + "attn_k.weight", (Hkv * D, H)),
            TensorSpec(b + "attn_v.weight", (Hkv * D, H), optional=True),
            TensorSpec(b + "attn_k_norm.weight", (D,)),
        ]
    if c.n_embd_pl:
        specs += [
            TensorSpec(b + "inp_gate.weight", (c.n_embd_pl, H)),
            TensorSpec(b + "proj.weight", (H, c.n_embd_pl)),
            TensorSpec(b + "post_norm.weight", (H,)),
        ]
    return specs + (moe_specs(c, il) if c.n_expert else [])


def tensor_specs(c: Config, part: str = "trunk", names=()) -> list[TensorSpec]:
    if part != "trunk":
        raise LlmkitError("gemma4 has no NextN blocks: its drafter is a gemma4-assistant GGUF")
    H, V, P = c.n_embd, c.n_vocab, c.n_layer * c.n_embd_pl
    specs = [
        TensorSpec("token_embd.weight", (V, H)),
        TensorSpec("output_norm.weight", (H,)),
        TensorSpec("output.weight", (V, H), optional=True),
        TensorSpec("rope_freqs.weight", (c.head_dim // 2,), optional=True),
    ]
    if c.n_embd_pl:
        specs += [
            TensorSpec("per_layer_token_embd.weight", (V, P)),
            TensorSpec("per_layer_model_proj.weight", (P, H)),
            TensorSpec("per_layer_proj_norm.weight", (c.n_embd_pl,)),
        ]
    return specs + [s for il in range(c.n_layer) for s in block_names(c, il)]


def load_weights(t: dict[str, QTensor], il: int, backend: Backend):
    """Block il's weights: fused q(k)(v), wo, gate|up, down, the norms and the output scale."""
    b = f"blk.{il}."
    lin = lambda *ns: ops.make_linear(backend, *(t[b + n + ".weight"] for n in ns))  # noqa: E731
    qkv = [n for n in ("attn_q", "attn_k", "attn_v") if b + n + ".weight" in t]
    w = {
        "wqkv": lin(*qkv),
        "wo": lin("attn_output"),
        "w_gate_up": lin("ffn_gate", "ffn_up"),
        "w_down": lin("ffn_down"),
        "scale": t[b + "layer_output_scale.weight"].dequantize(),
        "has_v": "attn_v" in qkv,
    }
    w |= {a: t[b + n + ".weight"].dequantize() for a, n in NORMS.items()}
    if b + "attn_k_norm.weight" in t:
        w["k_norm"] = t[b + "attn_k_norm.weight"].dequantize()
    if b + "inp_gate.weight" in t:
        w |= {"w_pl_gate": lin("inp_gate"), "w_pl_proj": lin("proj")}
        w["pl_norm"] = t[b + "post_norm.weight"].dequantize()
    return SimpleNamespace(**w)


class Block:
    """One Gemma 4 block. `owns_kv`: it writes its K/V; otherwise it attends over the layer
    `c.kv_owner[il]`'s cache with the K/V that layer computed for this batch (rewritten into
    the same slots, so every cache kind serves it unchanged)."""

    def __init__(self, c: Config, il: int, w, factors: torch.Tensor | None, moe=None):
        self.c, self.il, self.w, self.moe = c, il, w, moe
        swa = c.swa[il]
        self.D, self.n_kv = c.hd(il), c.kv_heads[il]
        self.owns_kv = il < c.n_kv_from_start
        self.window = c.sliding_window if swa else None
        self.rope = (
            (c.n_rot_swa, c.rope_base_swa, 1.0, None)
            if swa
            else (c.n_rot, c.rope_base, 1.0, factors)
        )

    def query(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q [T, Hq, D] normed and rotated, the raw k|v projection rows or None)."""
        c, w, T = self.c, self.w, x.shape[0]
        y = ops.linear(w.wqkv, x, norm=(w.attn_norm, c.eps))
        nq = c.n_head * self.D
        q = ops.rope(y[:, :nq].view(T, c.n_head, self.D), *rope, ROPE_NEOX, (w.q_norm, c.eps))
        return q, (y[:, nq:] if y.shape[1] > nq else None)

    def key_value(self, kv_rows: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        c, w, T, D, H = self.c, self.w, kv_rows.shape[0], self.D, self.n_kv
        k = kv_rows[:, : H * D]
        v = kv_rows[:, H * D :] if w.has_v else k
        k = ops.rope(k.reshape(T, H, D), *rope, ROPE_NEOX, (w.k_norm, c.eps))
        v = ops.rms_norm(v.reshape(T * H, D).contiguous(), None, c.eps).view(T, H, D)
        return k, v

    def finish(self, x: torch.Tensor, o: torch.Tensor, pl: torch.Tensor | None) -> torch.Tensor:
        """After attention (o [T, Hq * D]): output projection, FFN, per-layer input, scale."""
        c, w = self.c, self.w
        x = ops.linear(w.wo, o, post_norm=(w.post_attn_norm, c.eps), residual=x)
        h = ops.linear(w.w_gate_up, x, norm=(w.ffn_norm, c.eps))
        post = (w.post_ffw_norm, c.eps)
        if self.moe is None:
            x = ops.linear(w.w_down, h, glu_act="gelu_tanh", post_norm=post, residual=x)
        else:  # dense and routed FFNs side by side on x, each with its own post-norm
            s = ops.linear(
                w.w_down, h, glu_act="gelu_tanh", post_norm=(self.moe.post_norm_1, c.eps)
            )
            x = x + ops.rms_norm(s + self.moe(x), *post)
        if pl is not None:  # proj(gelu(gate x) * P_il): a GLU over [gate x | P_il]
            g = torch.cat((ops.linear(w.w_pl_gate, x), pl), dim=-1)
            x = ops.linear(
                w.w_pl_proj, g, glu_act="gelu_tanh", post_norm=(w.pl_norm, c.eps), residual=x
            )
        return x * w.scale

    def __call__(self, x, rope, att, kv: dict, pl=None) -> torch.Tensor:
        q, kv_rows = self.query(x, rope)
        if self.owns_kv:
            kv[self.il] = self.key_value(kv_rows, rope)
        owner = self.c.kv_owner[self.il]
        return self.finish(x, att.attend(owner, q, *kv[owner], 1.0), pl)


class Model(DecoderLM):
    """The trunk. `forward` returns the pre-norm hidden state (the contract); the assistant
    drafter normalises it with `output_norm` itself."""

    def __init__(self, c: Config, tensors: dict[str, QTensor], backend: Backend, mtp: bool = False):
        if mtp:
            raise LlmkitError(
                "gemma4 has no NextN blocks: give its assistant drafter with -md assistant.gguf"
            )
        self.factors = (
            tensors["rope_freqs.weight"].dequantize() if "rope_freqs.weight" in tensors else None
        )
        self.build(
            c, tensors, backend, Embedding(tensors["token_embd.weight"], math.sqrt(c.n_embd))
        )
        self.mtp = None
        # MoE routing reads the selected experts back to the host: no CUDA graph capture
        self.supports_cuda_graphs = not c.n_expert
        if c.n_embd_pl:
            d = c.n_embd_pl
            self.pl_embed = Embedding(tensors["per_layer_token_embd.weight"], math.sqrt(d))
            self.pl_proj = ops.make_linear(backend, tensors["per_layer_model_proj.weight"])
            self.pl_norm = tensors["per_layer_proj_norm.weight"].dequantize()

    def load_block(self, il: int) -> Block:
        c, t, be = self.config, self.tensors, self.backend
        moe = Gemma4Experts(c, t, il, be) if c.n_expert else None
        return Block(c, il, load_weights(t, il, be), self.factors, moe)

    def kv_layout(self) -> dict:
        c = self.config
        return {il: c.layer_kv(il) for il in range(c.n_layer) if il < c.n_kv_from_start}

    def per_layer_inputs(self, tokens: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """P [T, n_layer, d_pl] from the token ids and the scaled input embedding x0."""
        c, T = self.config, x0.shape[0]
        p = ops.linear(self.pl_proj, x0) * (1.0 / math.sqrt(c.n_embd))
        p = ops.rms_norm(p.view(T * c.n_layer, c.n_embd_pl), self.pl_norm, c.eps)
        e = self.pl_embed(tokens).view(T * c.n_layer, c.n_embd_pl)
        return ((p + e) * (1.0 / math.sqrt(2.0))).view(T, c.n_layer, c.n_embd_pl)

    def forward(
        self, tokens: torch.Tensor, cache, logits: Rows = "last", n_layer: int | None = None
    ) -> ForwardOutput:
        """`n_layer`: run only the first n_layer blocks (early exit), then the head."""
        tokens = token_ids(tokens)
        pos = cache.positions(tokens.numel())
        cache.begin(pos)
        memo: dict = {}
        kv: dict = {}  # owner layer -> this batch's (k, v), for the layers that share it
        x = self.embed(tokens)
        pl = self.per_layer_inputs(tokens, x) if self.config.n_embd_pl else None
        for il, blk in enumerate(self.blocks[:n_layer]):
            p = pl[:, il].contiguous() if pl is not None else None
            x = blk(x, rope_rows(blk.rope, pos, memo), cache, kv, p)
        out = None if logits is None else self.lm_logits(select_rows(x, logits))
        return ForwardOutput(out, x)
