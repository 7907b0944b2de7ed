"""HF checkpoint -> GGUF mappings per architecture, as llama.cpp's converter writes them.

Each architecture gives (1) its GGUF metadata from config.json and (2) a tensor-name table as data:
`(HF regex, GGUF name template, transform)`. Transforms: "permute_q"/"permute_k" (llama: the Q/K row
permutation that makes NORM rope on GGUF weights equal HF's rotate-half), "plus1" (Gemma/Step norms:
HF computes x * (1 + w), GGUF stores 1 + w). Unknown tensor names are an error, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmkit.errors import LlmkitError

L = r"model\.layers\.(\d+)\."

LLAMA = [
    (r"model\.embed_tokens\.weight", "token_embd.weight", None),
    (r"model\.norm\.weight", "output_norm.weight", None),
    (r"lm_head\.weight", "output.weight", None),
    (L + r"input_layernorm\.weight", "blk.{0}.attn_norm.weight", None),
    (L + r"self_attn\.q_proj\.weight", "blk.{0}.attn_q.weight", "permute_q"),
    (L + r"self_attn\.k_proj\.weight", "blk.{0}.attn_k.weight", "permute_k"),
    (L + r"self_attn\.v_proj\.weight", "blk.{0}.attn_v.weight", None),
    (L + r"self_attn\.o_proj\.weight", "blk.{0}.attn_output.weight", None),
    (L + r"post_attention_layernorm\.weight", "blk.{0}.ffn_norm.weight", None),
    (L + r"mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight", None),
    (L + r"mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight", None),
    (L + r"mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight", None),
]

GEMMA3 = [
    (r"model\.embed_tokens\.weight", "token_embd.weight", None),
    (r"model\.norm\.weight", "output_norm.weight", "plus1"),
    (r"lm_head\.weight", "output.weight", None),
    (L + r"input_layernorm\.weight", "blk.{0}.attn_norm.weight", "plus1"),
    (L + r"self_attn\.q_proj\.weight", "blk.{0}.attn_q.weight", None),
    (L + r"self_attn\.k_proj\.weight", "blk.{0}.attn_k.weight", None),
    (L + r"self_attn\.v_proj\.weight", "blk.{0}.attn_v.weight", None),
    (L + r"self_attn\.o_proj\.weight", "blk.{0}.attn_output.weight", None),
    (L + r"self_attn\.q_norm\.weight", "blk.{0}.attn_q_norm.weight", "plus1"),
    (L + r"self_attn\.k_norm\.weight", "blk.{0}.attn_k_norm.weight", "plus1"),
    (L + r"post_attention_layernorm\.weight", "blk.{0}.post_attention_norm.weight", "plus1"),
    (L + r"pre_feedforward_layernorm\.weight", "blk.{0}.ffn_norm.weight", "plus1"),
    (L + r"post_feedforward_layernorm\.weight", "blk.{0}.post_ffw_norm.weight", "plus1"),
    (L + r"mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight", None),
    (L + r"mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight", None),
    (L + r"mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight", None),
]

# Step3.5 hub layout: MTP layers are model.layers.{n_main + i} (".transformer." infix stripped first)
STEP35 = [
    (r"model\.embed_tokens\.weight", "token_embd.weight", None),
    (r"model\.norm\.weight", "output_norm.weight", "plus1"),
    (r"lm_head\.weight", "output.weight", None),
    (L + r"input_layernorm\.weight", "blk.{0}.attn_norm.weight", "plus1"),
    (L + r"self_attn\.q_proj\.weight", "blk.{0}.attn_q.weight", None),
    (L + r"self_attn\.k_proj\.weight", "blk.{0}.attn_k.weight", None),
    (L + r"self_attn\.v_proj\.weight", "blk.{0}.attn_v.weight", None),
    (L + r"self_attn\.o_proj\.weight", "blk.{0}.attn_output.weight", None),
    (L + r"self_attn\.q_norm\.weight", "blk.{0}.attn_q_norm.weight", "plus1"),
    (L + r"self_attn\.k_norm\.weight", "blk.{0}.attn_k_norm.weight", "plus1"),
    (L + r"self_attn\.g_proj\.weight", "blk.{0}.attn_gate.weight", None),
    (L + r"post_attention_layernorm\.weight", "blk.{0}.ffn_norm.weight", "plus1"),
    (L + r"mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight", None),
    (L + r"mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight", None),
    (L + r"mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight", None),
    (L + r"moe\.gate\.weight", "blk.{0}.ffn_gate_inp.weight", "f32"),
    (L + r"moe\.router_bias", "blk.{0}.exp_probs_b.bias", "f32"),
    (L + r"moe\.gate_proj\.weight", "blk.{0}.ffn_gate_exps.weight", None),
    (L + r"moe\.up_proj\.weight", "blk.{0}.ffn_up_exps.weight", None),
    (L + r"moe\.down_proj\.weight", "blk.{0}.ffn_down_exps.weight", None),
    (L + r"share_expert\.gate_proj\.weight", "blk.{0}.ffn_gate_shexp.weight", None),
    (L + r"share_expert\.up_proj\.weight", "blk.{0}.ffn_up_shexp.weight", None),
    (L + r"share_expert\.down_proj\.weight", "blk.{0}.ffn_down_shexp.weight", None),
    (L + r"eh_proj\.weight", "blk.{0}.nextn.eh_proj.weight", None),
    (L + r"enorm\.weight", "blk.{0}.nextn.enorm.weight", "plus1"),
    (L + r"hnorm\.weight", "blk.{0}.nextn.hnorm.weight", "plus1"),
    (L + r"shared_head\.norm\.weight", "blk.{0}.nextn.shared_head_norm.weight", "plus1"),
    (L + r"shared_head\.output\.weight", "blk.{0}.nextn.shared_head_head.weight", None),
    (L + r"embed_tokens\.weight", "blk.{0}.nextn.embed_tokens.weight", None),
]

# Gemma 4 assistants' centroid head is dropped, as llama.cpp's converter does
SKIP = re.compile(r"(.*(rotary_emb\.inv_freq|\.rope\.freqs)$)|masked_embedding\..*")


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, interleave the rotate-half layout: (n_head, 2, d/2, in) -> swap -> flatten."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@dataclass
class Mapped:
    name: str
    transform: str | None
    layer: int | None


@dataclass
class ArchPlan:
    arch: str
    table: list
    metadata: dict[str, Any]
    n_main: int  # blocks before the NextN ones
    n_nextn: int
    n_head: int = 0
    n_head_kv: int = 0
    extra: dict | None = None  # GGUF name -> tensor the converter generates (rope_freqs)

    def map(self, hf_name: str) -> Mapped | None:
        name = hf_name.replace(".transformer.", ".")
        for prefix in ("model.language_model.", "language_model.model.", "language_model."):
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :]
                break
        if SKIP.match(name):
            return None
        for pattern, template, transform in self.table:
            m = re.fullmatch(pattern, name)
            if m:
                layer = int(m.group(1)) if m.groups() else None
                return Mapped(template.format(*m.groups()), transform, layer)
        raise LlmkitError(f"unexpected tensor {hf_name} in a {self.arch} checkpoint")

    def apply(self, t: torch.Tensor, transform: str | None) -> torch.Tensor:
        t = t.float()
        if transform == "permute_q":
            return permute(t, self.n_head)
        if transform == "permute_k":
            return permute(t, self.n_head_kv)
        if transform == "plus1":
            return t + 1.0
        return t


def _rope_theta(cfg: dict, layer_type: str | None = None, default: float = 10000.0) -> float:
    rp = cfg.get("rope_parameters") or {}
    if layer_type and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    return float(rp.get("rope_theta", cfg.get("rope_theta", default)))


def _common(arch: str, c: dict) -> dict:
    return {
        f"{arch}.context_length": int(c.get("max_position_embeddings", 4096)),
        f"{arch}.embedding_length": int(c["hidden_size"]),
        f"{arch}.feed_forward_length": int(c["intermediate_size"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.get("rms_norm_eps", 1e-6)),
    }


def plan_for(config: dict, mtp_mode: str = "keep") -> ArchPlan:
    """The mapping and metadata for a config.json; mtp_mode: keep | drop (--no-mtp) | only."""
    archs = config.get("architectures") or []
    kind = (archs[0] if archs else "") or config.get("model_type", "")
    try:
        if kind in ("LlamaForCausalLM", "MistralForCausalLM", "llama", "mistral"):
            return _llama(config)
        if kind in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "gemma3", "gemma3_text"):
            return _gemma3(config.get("text_config", config))
        if kind in ("Step3p5ForCausalLM", "Step3p7ForCausalLM", "step3p5", "step3p7", "step35"):
            return _step35(config, mtp_mode)
    except KeyError as e:
        raise LlmkitError(f"config.json lacks {e.args[0]!r} (needed for {kind})") from None
    raise LlmkitError(
        f"unknown architecture {kind!r} in config.json (supported: llama, gemma3, gemma4, step3.5)"
    )


def _llama(c: dict) -> ArchPlan:
    n_head, n_layer = int(c["num_attention_heads"]), int(c["num_hidden_layers"])
    n_kv = int(c.get("num_key_value_heads") or n_head)
    hd = int(c.get("head_dim") or c["hidden_size"] // n_head)
    md = _common("llama", c) | {
        "llama.block_count": n_layer,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_kv,
        "llama.rope.freq_base": _rope_theta(c),
        "llama.rope.dimension_count": hd,
        "llama.vocab_size": int(c["vocab_size"]),
    }
    if hd != c["hidden_size"] // n_head:
        md["llama.attention.key_length"] = md["llama.attention.value_length"] = hd
    return ArchPlan("llama", LLAMA, md, n_layer, 0, n_head, n_kv)


def _gemma3(c: dict) -> ArchPlan:
    n_layer = int(c["num_hidden_layers"])
    md = _common("gemma3", c) | {
        "gemma3.block_count": n_layer,
        "gemma3.attention.head_count": int(c["num_attention_heads"]),
        "gemma3.attention.head_count_kv": int(c["num_key_value_heads"]),
        "gemma3.attention.key_length": int(c["head_dim"]),
        "gemma3.attention.value_length": int(c["head_dim"]),
        "gemma3.rope.freq_base": _rope_theta(c, "full_attention", 1e6),
        "gemma3.rope.freq_base_swa": _rope_theta(
            c, "sliding_attention", c.get("rope_local_base_freq", 10000.0)
        ),
    }
    if c.get("sliding_window"):
        md["gemma3.attention.sliding_window"] = int(c["sliding_window"])
    scaling = (c.get("rope_parameters") or {}).get("full_attention") or c.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear" or scaling.get("type") == "linear":
        md["gemma3.rope.scaling.type"] = "linear"
        md["gemma3.rope.scaling.factor"] = float(scaling["factor"])
    if c.get("final_logit_softcapping"):
        md["gemma3.final_logit_softcapping"] = float(c["final_logit_softcapping"])
    return ArchPlan("gemma3", GEMMA3, md, n_layer, 0)


def _step35(c: dict, mtp_mode: str) -> ArchPlan:
    n_main, nextn = int(c["num_hidden_layers"]), int(c.get("num_nextn_predict_layers", 0))
    n_all = n_main + nextn
    types = list(c.get("layer_types") or [])
    if len(types) < n_all:
        raise LlmkitError(
            f"layer_types has {len(types)} entries, need {n_all} (trunk + MTP layers)"
        )
    swa = [t == "sliding_attention" for t in types[:n_all]]
    other = c.get("attention_other_setting") or {}
    heads = [
        int(other.get("num_attention_heads", c["num_attention_heads"]))
        if s
        else int(c["num_attention_heads"])
        for s in swa
    ]
    kv = [
        int(other.get("num_attention_groups", c["num_attention_groups"]))
        if s
        else int(c["num_attention_groups"])
        for s in swa
    ]
    thetas = c.get("rope_theta")
    thetas = thetas if isinstance(thetas, list) else [thetas or 10000.0] * n_all
    full_theta = next((thetas[i] for i in range(n_all) if not swa[i]), thetas[0])
    swa_theta = next((thetas[i] for i in range(n_all) if swa[i]), thetas[0])
    for i, f in enumerate((c.get("partial_rotary_factors") or [])[:n_all]):
        if f != (1.0 if swa[i] else 0.5):
            raise LlmkitError(
                f"layer {i}: partial_rotary_factor {f} (step35 needs 1.0 sliding / 0.5 full)"
            )

    def limits(key):
        v = list(c.get(key) or [])
        return np.array([float(x or 0.0) for x in (v + [0.0] * n_all)[:n_all]], dtype=np.float32)

    keep = n_main if mtp_mode == "drop" else n_all
    md = (
        _common("step35", c)
        | {
            "step35.block_count": keep,
            "step35.attention.head_count": np.array(heads[:keep], np.int32),
            "step35.attention.head_count_kv": np.array(kv[:keep], np.int32),
            "step35.attention.key_length": int(c["head_dim"]),
            "step35.attention.value_length": int(c["head_dim"]),
            "step35.attention.sliding_window": int(c["sliding_window"]),
            "step35.attention.sliding_window_pattern": np.array(swa[:keep], np.bool_),
            "step35.rope.freq_base": float(full_theta),
            "step35.rope.freq_base_swa": float(swa_theta),
            "step35.expert_count": int(c["moe_num_experts"]),
            "step35.expert_used_count": int(c["moe_top_k"]),
            "step35.expert_feed_forward_length": int(c["moe_intermediate_size"]),
            "step35.expert_shared_feed_forward_length": int(c["share_expert_dim"]),
            "step35.expert_weights_norm": bool(c.get("norm_expert_weight", True)),
            "step35.expert_weights_scale": float(c.get("moe_router_scaling_factor", 1.0)),
            "step35.expert_gating_func": 2,  # sigmoid
            "step35.swiglu_clamp_exp": limits("swiglu_limits")[:keep],
            "step35.swiglu_clamp_shexp": limits("swiglu_limits_shared")[:keep],
        }
    )
    if nextn and mtp_mode != "drop":
        md["step35.nextn_predict_layers"] = nextn
    return ArchPlan("step35", STEP35, md, n_main, nextn)
