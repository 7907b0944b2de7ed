"""HF Gemma 4 -> GGUF (`gemma4` trunk and `gemma4-assistant` drafter), as llama.cpp's converter.

Norms are stored as is (Gemma 4 computes x * w, no +1). `rope_freqs.weight` is generated: 1 for
the rotated pairs of the full-attention head ("proportional" RoPE rotates the first
partial_rotary_factor * hd / 2 pairs), 1e30 for the others. transformers 5.25 writes the
full-layer head dim (and KV-head count) into `per_layer_config`, not `global_head_dim`.
The assistant's centroid head (`masked_embedding.*`) is dropped, as upstream does: the drafter
uses the full tied head. MoE checkpoints (`enable_moe_block`) follow llama.cpp's
conversion/gemma.py: `router.proj` -> ffn_gate_inp.weight, `router.scale` -> ffn_gate_inp.scale,
`router.per_expert_scale` -> ffn_down_exps.scale, `experts.gate_up_proj` -> ffn_gate_up_exps
(fused, gate rows first), `experts.down_proj` -> ffn_down_exps, plus expert_count /
expert_used_count / expert_feed_forward_length.
"""

from __future__ import annotations

import numpy as np
import torch

from llmkit.core.convert.archs import ArchPlan, L
from llmkit.errors import LlmkitError

GEMMA4 = [
    (r"model\.embed_tokens\.weight", "token_embd.weight", None),
    (r"model\.norm\.weight", "output_norm.weight", None),
    (r"lm_head\.weight", "output.weight", None),
    (r"model\.embed_tokens_per_layer\.weight", "per_layer_token_embd.weight", None),
    (r"model\.per_layer_model_projection\.weight", "per_layer_model_proj.weight", None),
    (r"model\.per_layer_projection_norm\.weight", "per_layer_proj_norm.weight", None),
    (r"pre_projection\.weight", "nextn.pre_projection.weight", None),
    (r"post_projection\.weight", "nextn.post_projection.weight", None),
    (L + r"input_layernorm\.weight", "blk.{0}.attn_norm.weight", None),
    (L + r"self_attn\.q_proj\.weight", "blk.{0}.attn_q.weight", None),
    (L + r"self_attn\.k_proj\.weight", "blk.{0}.attn_k.weight", None),
    (L + r"self_attn\.v_proj\.weight", "blk.{0}.attn_v.weight", None),
    (L + r"self_attn\.o_proj\.weight", "blk.{0}.attn_output.weight", None),
    (L + r"self_attn\.q_norm\.weight", "blk.{0}.attn_q_norm.weight", None),
    (L + r"self_attn\.k_norm\.weight", "blk.{0}.attn_k_norm.weight", None),
    (L + r"post_attention_layernorm\.weight", "blk.{0}.post_attention_norm.weight", None),
    (L + r"pre_feedforward_layernorm\.weight", "blk.{0}.ffn_norm.weight", None),
    (L + r"post_feedforward_layernorm\.weight", "blk.{0}.post_ffw_norm.weight", None),
    (L + r"mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight", None),
    (L + r"mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight", None),
    (L + r"mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight", None),
    (L + r"layer_scalar", "blk.{0}.layer_output_scale.weight", "f32"),
    (L + r"per_layer_input_gate\.weight", "blk.{0}.inp_gate.weight", None),
    (L + r"per_layer_projection\.weight", "blk.{0}.proj.weight", None),
    (L + r"post_per_layer_input_norm\.weight", "blk.{0}.post_norm.weight", None),
    (L + r"pre_feedforward_layernorm_2\.weight", "blk.{0}.pre_ffw_norm_2.weight", None),
    (L + r"post_feedforward_layernorm_1\.weight", "blk.{0}.post_ffw_norm_1.weight", None),
    (L + r"post_feedforward_layernorm_2\.weight", "blk.{0}.post_ffw_norm_2.weight", None),
    (L + r"router\.proj\.weight", "blk.{0}.ffn_gate_inp.weight", None),
    (L + r"router\.scale", "blk.{0}.ffn_gate_inp.scale", "f32"),
    (L + r"router\.per_expert_scale", "blk.{0}.ffn_down_exps.scale", "f32"),
    (L + r"experts\.gate_up_proj", "blk.{0}.ffn_gate_up_exps.weight", None),
    (L + r"experts\.down_proj", "blk.{0}.ffn_down_exps.weight", None),
]


def _layer_cfg(c: dict, il: int) -> dict:
    plc = c.get("per_layer_config") or {}
    return plc.get(str(il)) or plc.get(il) or {}


def _experts(p: str, c: dict) -> dict:
    """The MoE keys (empty for a dense checkpoint), validated like llama.cpp's loader needs them."""
    if not c.get("enable_moe_block"):
        return {}
    e, k = int(c.get("num_experts") or 0), int(c.get("top_k_experts") or 0)
    ff = int(c.get("moe_intermediate_size") or c.get("expert_intermediate_size") or 0)
    if not (e > 0 and 0 < k <= e and ff > 0):
        raise LlmkitError(
            f"gemma4: enable_moe_block needs num_experts > 0, top_k_experts in 1..num_experts and "
            f"moe_intermediate_size > 0 (got {e}, {k}, {ff})"
        )
    return {p + "expert_count": e, p + "expert_used_count": k, p + "expert_feed_forward_length": ff}


def _metadata(arch: str, c: dict) -> tuple[dict, torch.Tensor]:
    n = int(c["num_hidden_layers"])
    types = list(c.get("layer_types") or [])
    if len(types) != n:
        raise LlmkitError(f"gemma4: layer_types has {len(types)} entries, need {n}")
    swa = [t == "sliding_attention" for t in types]
    hd_swa = int(c.get("head_dim") or 256)
    full = [i for i in range(n) if not swa[i]]
    hd_full = int(
        (_layer_cfg(c, full[0]).get("head_dim") if full else None)
        or c.get("global_head_dim")
        or hd_swa
    )
    n_kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
    kv = [
        int(
            _layer_cfg(c, i).get("num_key_value_heads")
            or c.get("num_global_key_value_heads")
            or n_kv
        )
        if not swa[i]
        else n_kv
        for i in range(n)
    ]
    shared = int(c.get("num_kv_shared_layers") or 0)
    ff = int(c["intermediate_size"])
    ffs = [ff * 2 if c.get("use_double_wide_mlp") and i >= n - shared else ff for i in range(n)]
    rp = c.get("rope_parameters") or {}
    rp_full, rp_swa = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    p = f"{arch}."
    md = {
        p + "context_length": int(c.get("max_position_embeddings", 131072)),
        p + "embedding_length": int(c["hidden_size"]),
        p + "block_count": n,
        p + "feed_forward_length": np.array(ffs, np.int32) if len(set(ffs)) > 1 else ff,
        p + "attention.head_count": int(c["num_attention_heads"]),
        p + "attention.head_count_kv": np.array(kv, np.int32) if len(set(kv)) > 1 else n_kv,
        p + "attention.key_length": hd_full,
        p + "attention.value_length": hd_full,
        p + "attention.key_length_swa": hd_swa,
        p + "attention.value_length_swa": hd_swa,
        p + "attention.layer_norm_rms_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        p + "attention.sliding_window": int(c.get("sliding_window") or 0),
        p + "attention.sliding_window_pattern": np.array(swa, np.bool_),
        p + "attention.shared_kv_layers": shared,
        p + "embedding_length_per_layer_input": int(c.get("hidden_size_per_layer_input") or 0),
        p + "rope.freq_base": float(rp_full.get("rope_theta", 1e6)),
        p + "rope.freq_base_swa": float(rp_swa.get("rope_theta", 10000.0)),
        p + "rope.dimension_count": hd_full,
        p + "rope.dimension_count_swa": int(
            hd_swa * float(rp_swa.get("partial_rotary_factor", 1.0))
        ),
    }
    md |= _experts(p, c)
    if c.get("final_logit_softcapping"):
        md[p + "final_logit_softcapping"] = float(c["final_logit_softcapping"])
    if c.get("attention_k_eq_v"):
        raise LlmkitError("gemma4: attention_k_eq_v checkpoints are not supported by the converter")
    factor = float(rp_full.get("partial_rotary_factor", 1.0))
    rotated = int(factor * hd_full) // 2
    freqs = torch.full((hd_full // 2,), 1e30)
    freqs[:rotated] = 1.0
    return md, freqs


def gemma4_plan(c: dict) -> ArchPlan:
    md, freqs = _metadata("gemma4", c)
    plan = ArchPlan("gemma4", GEMMA4, md, int(c["num_hidden_layers"]), 0)
    plan.extra = {"rope_freqs.weight": freqs}
    return plan


def gemma4_assistant_plan(c: dict) -> ArchPlan:
    tc = c.get("text_config")
    if not isinstance(tc, dict):
        raise LlmkitError("gemma4-assistant: config.json has no text_config")
    tc = dict(tc)
    if tc.get("enable_moe_block"):
        raise LlmkitError("gemma4-assistant: mixture-of-experts drafters are not expected")
    n = int(tc["num_hidden_layers"])
    tc["num_kv_shared_layers"] = int(tc.get("num_kv_shared_layers") or n)
    if tc["num_kv_shared_layers"] != n:
        raise LlmkitError("gemma4-assistant: every layer must share the target's KV")
    md, freqs = _metadata("gemma4-assistant", tc)
    md["gemma4-assistant.embedding_length_out"] = int(c["backbone_hidden_size"])
    md["gemma4-assistant.nextn_predict_layers"] = n
    plan = ArchPlan("gemma4-assistant", GEMMA4, md, n, 0)
    plan.extra = {"rope_freqs.weight": freqs}
    return plan


def gemma4_plan_for(config: dict) -> ArchPlan | None:
    """The plan when config.json is a Gemma 4 text model or assistant, else None."""
    archs = config.get("architectures") or []
    kind = (archs[0] if archs else "") or config.get("model_type", "")
    try:
        if kind in ("Gemma4AssistantForCausalLM", "gemma4_assistant"):
            return gemma4_assistant_plan(config)
        if kind in ("Gemma4ForCausalLM", "gemma4_text"):
            return gemma4_plan(config)
    except KeyError as e:
        raise LlmkitError(f"config.json lacks {e.args[0]!r} (needed for {kind})") from None
    return None
