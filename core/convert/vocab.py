"""Tokenizer metadata for `llm convert`, as llama.cpp's converter writes it.

* SPM (`tokenizer.model`, sentencepiece): `tokenizer.ggml.model = llama`, tokens / scores / token
  types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
* BPE (`tokenizer.json`, HF tokenizers): `tokenizer.ggml.model = gpt2`, tokens, token types (added
  special tokens are control, other added tokens user-defined), merges as "a b", and the
  pre-tokenizer name llama.cpp uses to pick its regexes (recognised from the pre-tokenizer config).
Special ids, add_bos/add_eos and the chat template come from tokenizer_config.json / config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import LlmkitError

# regexes of known BPE pre-tokenizers (the Split pattern in tokenizer.json) -> llama.cpp pre name
LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {LLAMA3_RE: "llama-bpe", QWEN2_RE: "qwen2"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise LlmkitError(f"cannot read {path}: {e}") from None


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def spm_vocab(path: Path) -> dict[str, Any]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise LlmkitError(f"cannot load {path}: {e}") from None
    n = sp.GetPieceSize()
    tokens, scores, types = [], np.zeros(n, np.float32), np.ones(n, np.int32)
    for i in range(n):
        tokens.append(sp.IdToPiece(i))
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = 2
        elif sp.IsControl(i):
            types[i] = 3
        elif sp.IsUnused(i):
            types[i] = 5
        elif sp.IsByte(i):
            types[i] = 6
    # the dummy-prefix flag lives in the model proto's normalizer spec: observe it instead of parsing
    prefix = sp.EncodeAsPieces("a")[0].startswith("\u2581")
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": prefix,
    }
    for key, fn in (
        ("bos", sp.bos_id),
        ("eos", sp.eos_id),
        ("unknown", sp.unk_id),
        ("padding", sp.pad_id),
    ):
        if fn() >= 0:
            md[f"tokenizer.ggml.{key}_token_id"] = fn()
    return md


def _bpe_pre_name(pre: dict | None) -> str:
    if not pre:
        return "default"
    kind = pre.get("type")
    if kind == "ByteLevel":
        return "gpt-2"
    if kind == "Sequence":
        items = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in items]
        if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits"):
            return "smollm"
        if kinds and kinds[0] == "Split":
            regex = (items[0].get("pattern") or {}).get("Regex")
            if regex in KNOWN_SPLITS:
                return KNOWN_SPLITS[regex]
    raise LlmkitError(f"unrecognised BPE pre-tokenizer {json.dumps(pre)[:120]}")


def bpe_vocab(path: Path) -> dict[str, Any]:
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LlmkitError(
            f"{path}: tokenizer model {model.get('type')!r} is not supported (need BPE)"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for text, t in added.items():
        vocab[text] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = np.full(n, 5, np.int32)  # holes in the id space are unused
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = 1 if t is None else (3 if t.get("special") else 4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _bpe_pre_name(tj.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


def gemma4_vocab(path: Path) -> dict[str, Any]:
    """Gemma 4's SPM-style BPE (`tokenizer.json`: raw UTF-8 merges, U+2581 for spaces, byte
    fallback) as llama.cpp's converter writes it: model `gemma4`, `<0xXX>` tokens typed byte,
    added special tokens control, other added tokens user-defined."""
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LlmkitError(f"{path}: Gemma 4 tokenizer model {model.get('type')!r} is not BPE")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    vocab |= {text: t["id"] for text, t in added.items()}
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = np.full(n, 5, np.int32)
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        if t is not None:
            types[i] = 3 if t.get("special") else 4
        else:
            types[i] = 6 if len(text) == 6 and text.startswith("<0x") and text[-1] == ">" else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_space_prefix": False,
    }


def _is_gemma4(config: dict) -> bool:
    kinds = [*(config.get("architectures") or []), config.get("model_type") or ""]
    return any(str(k).lower().startswith("gemma4") for k in kinds)


def vocab_metadata(hf_dir: Path, config: dict) -> dict[str, Any]:
    """All tokenizer.* keys for the checkpoint in `hf_dir`."""
    if (hf_dir / "tokenizer.json").exists() and _is_gemma4(config):
        md = gemma4_vocab(hf_dir / "tokenizer.json")
    elif (hf_dir / "tokenizer.json").exists() and not (hf_dir / "tokenizer.model").exists():
        md = bpe_vocab(hf_dir / "tokenizer.json")
    elif (hf_dir / "tokenizer.model").exists():
        md = spm_vocab(hf_dir / "tokenizer.model")
    else:
        raise LlmkitError(f"{hf_dir}: no tokenizer.model or tokenizer.json")
    tc = _read_json(hf_dir / "tokenizer_config.json")
    index = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_str(tc.get(f"{key}_token"))
        gkey = {"unk": "unknown", "pad": "padding"}.get(key, key)
        if text in index:
            md[f"tokenizer.ggml.{gkey}_token_id"] = index[text]
        elif isinstance(config.get(f"{key}_token_id"), int):
            md[f"tokenizer.ggml.{gkey}_token_id"] = config[f"{key}_token_id"]
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(tc.get(flag), bool):
            md[f"tokenizer.ggml.{flag}"] = tc[flag]
    template = tc.get("chat_template")
    if not template and (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        md["tokenizer.chat_template"] = template
    return md
