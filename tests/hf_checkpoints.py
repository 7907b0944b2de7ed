"""Tiny random Hugging Face checkpoints (transformers) with real tokenizer files, for convert tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = (Path(__file__).parent / "data" / "ppl_text.txt").read_text()


def _bpe_tokenizer(d: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            }
        )
    )
    return tok.get_vocab_size()


def _spm_tokenizer(d: Path) -> int:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 3),
        model_prefix=str(d / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True})
    )
    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).GetPieceSize()


def write_hf_llama(d: Path, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    d.mkdir(parents=True, exist_ok=True)
    vocab = _bpe_tokenizer(d)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    return model


def write_hf_gemma3(d: Path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d.mkdir(parents=True, exist_ok=True)
    vocab = _spm_tokenizer(d)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=7,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=4,
        max_position_embeddings=256,
        query_pre_attn_scalar=32,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to zero (= scale 1); randomise them to test the +1
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.2)
    model.save_pretrained(d)
    return model


# GGUF name -> Step3.5 hub name (the inverse of llama.cpp's mapping), "+1" marks the norms
_STEP35_INV = [
    ("token_embd.weight", "model.embed_tokens.weight", False),
    ("output_norm.weight", "model.norm.weight", True),
    ("output.weight", "lm_head.weight", False),
    ("attn_norm.weight", "input_layernorm.weight", True),
    ("attn_q.weight", "self_attn.q_proj.weight", False),
    ("attn_k.weight", "self_attn.k_proj.weight", False),
    ("attn_v.weight", "self_attn.v_proj.weight", False),
    ("attn_output.weight", "self_attn.o_proj.weight", False),
    ("attn_q_norm.weight", "self_attn.q_norm.weight", True),
    ("attn_k_norm.weight", "self_attn.k_norm.weight", True),
    ("attn_gate.weight", "self_attn.g_proj.weight", False),
    ("ffn_norm.weight", "post_attention_layernorm.weight", True),
    ("ffn_gate.weight", "mlp.gate_proj.weight", False),
    ("ffn_up.weight", "mlp.up_proj.weight", False),
    ("ffn_down.weight", "mlp.down_proj.weight", False),
    ("ffn_gate_inp.weight", "moe.gate.weight", False),
    ("exp_probs_b.bias", "moe.router_bias", False),
    ("ffn_gate_exps.weight", "moe.gate_proj.weight", False),
    ("ffn_up_exps.weight", "moe.up_proj.weight", False),
    ("ffn_down_exps.weight", "moe.down_proj.weight", False),
    ("ffn_gate_shexp.weight", "share_expert.gate_proj.weight", False),
    ("ffn_up_shexp.weight", "share_expert.up_proj.weight", False),
    ("ffn_down_shexp.weight", "share_expert.down_proj.weight", False),
    ("nextn.eh_proj.weight", "eh_proj.weight", False),
    ("nextn.enorm.weight", "enorm.weight", True),
    ("nextn.hnorm.weight", "hnorm.weight", True),
    ("nextn.shared_head_norm.weight", "transformer.shared_head.norm.weight", True),
    ("nextn.shared_head_head.weight", "transformer.shared_head.output.weight", False),
    ("nextn.embed_tokens.weight", "transformer.embed_tokens.weight", False),
]


def write_hf_step35(d: Path, gguf_path: Path) -> dict:
    """A Step3.5 hub-layout checkpoint holding the (dequantized) weights of a tiny step35 GGUF."""
    from safetensors.torch import save_file

    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.quant.dequant import dequantize

    d.mkdir(parents=True, exist_ok=True)
    g = GGUFFile(gguf_path)
    md, sd = g.metadata, {}
    for name, info in g.tensors.items():
        if name == "rope_freqs.weight":
            continue  # llama3-style factors come from config rope_scaling, not from the checkpoint
        w = dequantize(torch.from_numpy(g.raw(name)), info.qtype, info.shape)
        for gg, hf, plus1 in _STEP35_INV:
            if name == gg or name.endswith("." + gg):
                prefix = f"model.layers.{name.split('.')[1]}." if name.startswith("blk.") else ""
                sd[prefix + hf] = (w - 1.0 if plus1 else w).contiguous()
                break
        else:
            raise KeyError(name)
    save_file(sd, str(d / "model.safetensors"))
    a = "step35."
    n_all, nextn = md[a + "block_count"], md[a + "nextn_predict_layers"]
    swa = [bool(x) for x in md[a + "attention.sliding_window_pattern"]]
    heads, kv = md[a + "attention.head_count"].tolist(), md[a + "attention.head_count_kv"].tolist()
    full = swa.index(False)
    sl = swa.index(True)
    cfg = {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "hidden_size": md[a + "embedding_length"],
        "num_hidden_layers": n_all - nextn,
        "num_nextn_predict_layers": nextn,
        "vocab_size": g.tensors["token_embd.weight"].shape[0],
        "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
        "num_attention_heads": heads[full],
        "num_attention_groups": kv[full],
        "attention_other_setting": {
            "num_attention_heads": heads[sl],
            "num_attention_groups": kv[sl],
        },
        "head_dim": md[a + "attention.key_length"],
        "intermediate_size": md[a + "feed_forward_length"],
        "moe_intermediate_size": md[a + "expert_feed_forward_length"],
        "share_expert_dim": md[a + "expert_shared_feed_forward_length"],
        "moe_num_experts": md[a + "expert_count"],
        "moe_top_k": md[a + "expert_used_count"],
        "moe_router_scaling_factor": md.get(a + "expert_weights_scale", 1.0),
        "norm_expert_weight": bool(md.get(a + "expert_weights_norm", True)),
        "rope_theta": [
            md[a + "rope.freq_base_swa"] if s else md[a + "rope.freq_base"] for s in swa
        ],
        "partial_rotary_factors": [1.0 if s else 0.5 for s in swa],
        "sliding_window": md[a + "attention.sliding_window"],
        "rms_norm_eps": md[a + "attention.layer_norm_rms_epsilon"],
        "max_position_embeddings": md[a + "context_length"],
        "swiglu_limits": [float(x) or None for x in md.get(a + "swiglu_clamp_exp", [0.0] * n_all)],
        "swiglu_limits_shared": [
            float(x) or None for x in md.get(a + "swiglu_clamp_shexp", [0.0] * n_all)
        ],
    }
    (d / "config.json").write_text(json.dumps(cfg, default=float))
    _bpe_tokenizer(d)
    return cfg
