"""SPM tokenization (core/tokenizer/spm.py) on tiny vocabularies: by hand, and against a direct
Python transcription of llama.cpp's llm_tokenizer_spm (`ref_spm`); the native merge loop against
its Python fallback. The real-model references are in test_tokenizer.py."""

from __future__ import annotations

import heapq
import json
import random
from pathlib import Path

import numpy as np
import pytest

from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.tokenizer import CONTROL, NORMAL, load_tokenizer
from llmkit.core.tokenizer.spm import SpmEngine
from llmkit.errors import LlmkitError

REFS = json.loads((Path(__file__).parent / "data" / "tokenizer_refs.json").read_text())


def ref_spm(tokens: list[str], scores: list[float], text: str) -> list[int]:
    """llama.cpp llm_tokenizer_spm_session::tokenize, on characters."""
    index = {t: i for i, t in enumerate(tokens)}
    start, size = list(range(len(text))), [1] * len(text)
    prev, nxt = list(range(-1, len(text) - 1)), list(range(1, len(text) + 1))
    if text:
        nxt[-1] = -1
    heap: list = []

    def add(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        piece = text[start[left] : start[left] + size[left] + size[right]]
        if piece in index:
            heapq.heappush(heap, (-scores[index[piece]], left, right, len(piece)))

    for i in range(1, len(text)):
        add(i - 1, i)
    while heap:
        _, left, right, length = heapq.heappop(heap)
        if not size[left] or not size[right] or size[left] + size[right] != length:
            continue
        size[left] += size[right]
        size[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])
    out, i = [], 0 if text else -1
    while i != -1:
        piece = text[start[i] : start[i] + size[i]]
        if piece in index:
            out.append(index[piece])
        else:
            out.extend(index[f"<0x{b:02X}>"] for b in piece.encode())
        i = nxt[i]
    return out


def spm_metadata(tokens, scores, types=None, **extra) -> dict:
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types or [NORMAL] * len(tokens), dtype=np.int32),
    }
    md.update({f"tokenizer.ggml.{k}": v for k, v in extra.items()})
    return md


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def test_tiny_spm_by_hand():
    tokens = ["<unk>", "<s>", "</s>", *BYTES, "▁", "a", "b", "ab", "▁ab", "ba", "<eos>"]
    scores = [0.0] * 259 + [-1.0, -2.0, -2.0, -0.5, -0.1, -0.5, -9.0]
    types = [2, 3, 3] + [6] * 256 + [NORMAL] * 6 + [CONTROL]
    idx = tokens.index
    plain = load_tokenizer(spm_metadata(tokens, scores, types, add_space_prefix=False))
    # "ab" and "ba" tie at -0.5: the leftmost pair merges first
    assert plain.encode("aba", add_special=False) == [idx("ab"), idx("a")]
    assert plain.encode("bab", add_special=False) == [idx("ba"), idx("b")]
    assert plain.encode("ab", add_special=True) == [1, idx("ab")]
    tok = load_tokenizer(spm_metadata(tokens, scores, types))  # SPM default: space prefix on
    assert tok.encode("ab", add_special=False) == [idx("▁ab")]
    # unknown characters fall back to their UTF-8 bytes
    assert tok.encode("é", add_special=False) == [idx("▁"), idx("<0xC3>"), idx("<0xA9>")]
    # special text is split out and the space prefix comes back after it
    assert tok.encode("ab<eos>ab", add_special=False) == [idx("▁ab"), idx("<eos>"), idx("▁ab")]
    assert tok.encode("ab<eos>ab", add_special=False, parse_special=False)[0] == idx("▁ab")
    # the leading space of the first token is dropped, but not after a (hidden) BOS
    assert tok.decode([idx("▁ab")]) == "ab"
    assert tok.decode([1, idx("▁ab"), idx("<eos>")]) == " ab"
    assert tok.decode([1, idx("▁ab")], special=True) == "<s> ab"
    assert tok.decode([1, idx("▁ab")], special=True, remove_special=True) == " ab"


@pytest.mark.parametrize("seed", range(6))
def test_tiny_spm_matches_llama_algorithm(seed):
    rng = random.Random(seed)
    alphabet = "ab▁é中"
    pieces = set(alphabet[:4])
    while len(pieces) < 40:
        pieces.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4))))
    pieces = sorted(pieces) + ["<ctl>", "<0x3C>"]
    tokens = ["<unk>", *BYTES, *[p for p in pieces if p not in BYTES]]
    scores = [0.0] + [0.0] * 256 + [float(rng.choice([-1, -2, -3, -2.5])) for _ in tokens[257:]]
    types = [2] + [6] * 256 + [rng.choice([NORMAL, NORMAL, CONTROL, 5]) for _ in tokens[257:]]
    md = spm_metadata(tokens, scores, types, add_space_prefix=False, add_bos_token=False)
    tok = load_tokenizer(md)
    for _ in range(200):
        text = "".join(rng.choice("ab é中xy😀") for _ in range(rng.randint(0, 25)))
        expected = ref_spm(tokens, scores, text.replace(" ", "▁"))
        assert tok.encode(text, add_special=False, parse_special=False) == expected, text


def test_spm_engine_without_the_native_library_is_the_same(gemma_gguf):
    """SPM's merge loop in Python (no native library) gives the native loop's ids: Gemma's long
    reference document and random text over a tiny vocabulary with ties and byte fallback."""
    vocab = load_tokenizer(GGUFFile(gemma_gguf).metadata).vocab
    native, python = SpmEngine(vocab), SpmEngine(vocab, native=False)
    assert native._lib is not None and python._lib is None
    doc = REFS["documents"]["gemma"].replace(" ", "\u2581")[:20000]
    assert native.encode(doc) == python.encode(doc)
    rng = random.Random(7)
    tokens = ["<unk>", *BYTES, "a", "b", "ab", "ba", "aba", "中", "中a", "▁a"]
    scores = [0.0] * 257 + [-1.0, -1.0, -2.0, -2.0, -1.5, -3.0, -0.5, -1.0]
    vocab = load_tokenizer(spm_metadata(tokens, scores, add_space_prefix=False)).vocab
    native, python = SpmEngine(vocab), SpmEngine(vocab, native=False)
    for _ in range(300):
        text = "".join(rng.choice("ab▁中é😀") for _ in range(rng.randint(0, 30)))
        assert native.encode(text) == python.encode(text) == ref_spm(tokens, scores, text), text


def test_spm_byte_fallback_without_a_byte_token_is_an_error():
    tokens = ["<unk>", "a", "b", "ab"]
    tok = load_tokenizer(spm_metadata(tokens, [0.0, -1.0, -1.0, -0.5], add_space_prefix=False))
    for engine in (SpmEngine(tok.vocab), SpmEngine(tok.vocab, native=False)):
        assert engine.encode("abab") == [3, 3]
        with pytest.raises(LlmkitError, match="no byte token for 0x63"):
            engine.encode("abc")
