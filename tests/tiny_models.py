"""Tiny random llama / gemma3 GGUF models for fast tests, written with llmkit's GGUF writer.

Both carry a small SPM vocabulary (byte-fallback tokens + a few pieces) so the whole CLI path runs.
Weights are quantized to a mix of types (Q8_0, Q4_0, Q5_0, Q4_1, F16) to exercise dequantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from llmkit.core.gguf.writer import encode_tensor, write_gguf

PIECES = [
    "▁the",
    "▁a",
    "▁cat",
    "▁dog",
    "▁sat",
    "▁on",
    "▁mat",
    "▁hello",
    "▁world",
    "th",
    "he",
    "▁",
    "e",
    "t",
    "a",
    "o",
    "s",
    "n",
    "r",
    "l",
    "d",
    "c",
    "h",
    "w",
    "m",
    "g",
]


def spm_vocab(n_vocab: int) -> dict:
    """<unk>, <s>, </s>, 256 byte tokens, pieces, then filler pieces up to n_vocab."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(PIECES))]
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(f"▁w{i}")
        types.append(1)
        scores.append(-100.0 - i)
        i += 1
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens[:n_vocab],
        "tokenizer.ggml.scores": np.array(scores[:n_vocab], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types[:n_vocab], dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }


def _w(rng, *shape, scale=0.08):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _norm(rng, n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


QTYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.F16]


def write_tiny_llama(
    path: Path,
    seed: int = 0,
    n_vocab: int = 320,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 96,
    tied: bool = True,
    edit=None,
) -> Path:
    """`edit(metadata, tensors)` may change either before writing and return a new arch name."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head
    md = {
        "llama.context_length": 256,
        "llama.embedding_length": n_embd,
        "llama.block_count": n_layer,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": hd,
        "general.size_label": "tiny",
        "general.file_type": 7,
        **spm_vocab(n_vocab),
    }
    t = {
        "token_embd.weight": encode_tensor(_w(rng, n_vocab, n_embd, scale=1.0), QT.Q8_0),
        "output_norm.weight": _norm(rng, n_embd),
    }
    if not tied:
        t["output.weight"] = encode_tensor(_w(rng, n_vocab, n_embd), QT.Q8_0)
    for i in range(n_layer):
        b, q = f"blk.{i}.", QTYPES[i % len(QTYPES)]
        t[b + "attn_norm.weight"] = _norm(rng, n_embd)
        t[b + "attn_q.weight"] = encode_tensor(_w(rng, n_head * hd, n_embd), q)
        t[b + "attn_k.weight"] = encode_tensor(_w(rng, n_head_kv * hd, n_embd), q)
        t[b + "attn_v.weight"] = encode_tensor(_w(rng, n_head_kv * hd, n_embd), q)
        t[b + "attn_output.weight"] = encode_tensor(_w(rng, n_embd, n_head * hd), q)
        t[b + "ffn_norm.weight"] = _norm(rng, n_embd)
        t[b + "ffn_gate.weight"] = encode_tensor(_w(rng, n_ff, n_embd), q)
        t[b + "ffn_up.weight"] = encode_tensor(_w(rng, n_ff, n_embd), q)
        t[b + "ffn_down.weight"] = encode_tensor(_w(rng, n_embd, n_ff), q)
    arch = "llama"
    if edit is not None:
        arch = edit(md, t) or arch
    return write_gguf(path, arch, md, t)


def write_tiny_gemma3(
    path: Path,
    seed: int = 0,
    n_vocab: int = 320,
    n_embd: int = 64,
    n_layer: int = 7,
    n_head: int = 2,
    n_head_kv: int = 1,
    head_dim: int = 32,
    n_ff: int = 96,
    window: int = 8,
) -> Path:
    """7 layers: layers 0-4 and 6 slide over `window` tokens, layer 5 is global."""
    rng = np.random.default_rng(seed)
    md = {
        "gemma3.context_length": 256,
        "gemma3.embedding_length": n_embd,
        "gemma3.block_count": n_layer,
        "gemma3.feed_forward_length": n_ff,
        "gemma3.attention.head_count": n_head,
        "gemma3.attention.head_count_kv": n_head_kv,
        "gemma3.attention.key_length": head_dim,
        "gemma3.attention.value_length": head_dim,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.attention.sliding_window": window,
        "general.size_label": "tiny",
        "general.file_type": 7,
        **spm_vocab(n_vocab),
        "tokenizer.ggml.add_space_prefix": False,
    }
    t = {
        "token_embd.weight": encode_tensor(_w(rng, n_vocab, n_embd, scale=0.2), QT.Q8_0),
        "output_norm.weight": _norm(rng, n_embd),
    }
    for i in range(n_layer):
        b, q = f"blk.{i}.", QTYPES[i % len(QTYPES)]
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            t[b + n + ".weight"] = _norm(rng, n_embd)
        t[b + "attn_q_norm.weight"] = _norm(rng, head_dim)
        t[b + "attn_k_norm.weight"] = _norm(rng, head_dim)
        t[b + "attn_q.weight"] = encode_tensor(_w(rng, n_head * head_dim, n_embd), q)
        t[b + "attn_k.weight"] = encode_tensor(_w(rng, n_head_kv * head_dim, n_embd), q)
        t[b + "attn_v.weight"] = encode_tensor(_w(rng, n_head_kv * head_dim, n_embd), q)
        t[b + "attn_output.weight"] = encode_tensor(_w(rng, n_embd, n_head * head_dim), q)
        t[b + "ffn_gate.weight"] = encode_tensor(_w(rng, n_ff, n_embd), q)
        t[b + "ffn_up.weight"] = encode_tensor(_w(rng, n_ff, n_embd), q)
        t[b + "ffn_down.weight"] = encode_tensor(_w(rng, n_embd, n_ff), q)
    return write_gguf(path, "gemma3", md, t)
