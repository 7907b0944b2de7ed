"""Tokenizer tests: token ids, pieces and vocab facts identical to llama.cpp's.

References in tests/data/tokenizer_refs.json come from llama.cpp itself (llama-cpp-python, see
scripts/make_tokenizer_refs.py) for Gemma 3 (SPM), SmolLM2 (BPE) and variants of their vocabularies
with other pre-tokenizers and flags. Tiny hand-made vocabularies check the algorithms against a
direct Python transcription of llama.cpp's merge loops, independently of the real models (SPM's:
test_tokenizer_spm.py).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from llmkit.core.tokenizer import CONTROL, NORMAL, USER_DEFINED, Tokenizer, load_tokenizer
from llmkit.core.tokenizer.stlmap import iteration_order, stl_hash
from llmkit.core.tokenizer.unicode import BYTE_TO_UNICODE, byte_encode
from llmkit.errors import LlmkitError

REFS_PATH = Path(__file__).parent / "data" / "tokenizer_refs.json"
REFS = json.loads(REFS_PATH.read_text())
VARIANTS = sorted(REFS["variants"])
STRINGS = REFS["strings"]


# --- real models ----------------------------------------------------------------------------


def _read_metadata(path: Path) -> dict:
    from llmkit.core.gguf.reader import GGUFFile

    return GGUFFile(path).metadata


@pytest.fixture(scope="module")
def base_metadata(gemma_gguf, smollm_gguf):
    """Metadata of both models, read once per test module."""
    return {"gemma": _read_metadata(gemma_gguf), "smollm": _read_metadata(smollm_gguf)}


@pytest.fixture(scope="module")
def tokenizer_for(base_metadata):
    """Tokenizer of a reference variant: the base metadata with the recorded overrides."""
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            variant = REFS["variants"][name]
            md = dict(base_metadata[variant["base"]])
            for key, value in variant["overrides"].items():
                if key == "tokens":
                    tokens = list(md["tokenizer.ggml.tokens"])
                    for index, text in value.items():
                        tokens[int(index)] = text
                    md["tokenizer.ggml.tokens"] = tokens
                else:
                    md[key] = value
            cache[name] = load_tokenizer(md)
        return cache[name]

    return get


def _report(mismatches: list, total: int) -> str:
    lines = [f"{len(mismatches)}/{total} differ from llama.cpp, first ones:"]
    lines += [f"  {m!r}" for m in mismatches[:5]]
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_encode_matches_llama_cpp(tokenizer_for, name):
    tok = tokenizer_for(name)
    variant = REFS["variants"][name]
    mismatches, total = [], 0
    for combo, expected_all in variant["encode"].items():
        flags = dict(part.split("=") for part in combo.split(","))
        add_special, parse_special = (
            bool(int(flags["add_special"])),
            bool(int(flags["parse_special"])),
        )
        for index, expected in zip(variant["strings"], expected_all, strict=True):
            total += 1
            got = tok.encode(STRINGS[index], add_special=add_special, parse_special=parse_special)
            if got != expected:
                mismatches.append((combo, STRINGS[index], got, expected))
    print(f"{name}: {total - len(mismatches)}/{total} encodings match llama.cpp")
    assert not mismatches, _report(mismatches, total)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_detokenize_matches_llama_cpp(tokenizer_for, name):
    tok = tokenizer_for(name)
    variant = REFS["variants"][name]
    ids_all = variant["encode"]["add_special=1,parse_special=1"]
    mismatches, total = [], 0
    for mode, expected_all in variant["detokenize"].items():
        flags = dict(part.split("=") for part in mode.split(","))
        remove, unparse = bool(int(flags["remove_special"])), bool(int(flags["unparse_special"]))
        for ids, expected in zip(ids_all, expected_all, strict=True):
            total += 1
            got = tok.detokenize(ids, special=unparse, remove_special=remove)
            if got != bytes.fromhex(expected):
                mismatches.append((mode, ids, got, bytes.fromhex(expected)))
    assert not mismatches, _report(mismatches, total)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_vocab_facts_match_llama_cpp(tokenizer_for, name):
    tok = tokenizer_for(name)
    facts = REFS["variants"][name]["facts"]
    assert tok.n_vocab == facts["n_vocab"]
    assert (tok.add_bos, tok.add_eos) == (facts["add_bos"], facts["add_eos"])
    for role, expected in facts["ids"].items():
        assert tok.vocab.ids.get(role) == expected, role
    assert sorted(tok.eog_ids) == facts["eog"]
    attrs = tok.vocab.attrs
    for start, count, attr in facts["attrs_rle"]:
        assert attrs[start : start + count] == [attr] * count, (
            f"attrs of ids {start}..{start + count}"
        )
    for mode, digests in facts["piece_digests"].items():
        for block, expected in enumerate(digests):
            h = hashlib.sha256()
            for i in range(block * 8192, min(tok.n_vocab, (block + 1) * 8192)):
                piece = tok.token_to_piece(i, special=mode == "special")
                h.update(len(piece).to_bytes(4, "little") + piece)
            assert h.hexdigest()[:16] == expected, f"{mode} pieces of block {block}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "smollm"])
def test_long_document_matches_llama_cpp(tokenizer_for, name):
    tok = tokenizer_for(name)
    expected = REFS["variants"][name]["document_ids"]
    assert tok.encode(REFS["documents"][name]) == expected


@pytest.mark.slow
def test_api_facts(tokenizer_for):
    gemma, smollm = tokenizer_for("gemma"), tokenizer_for("smollm")
    assert (gemma.bos_id, gemma.eos_id, gemma.eot_id, gemma.add_bos) == (2, 1, 106, True)
    assert gemma.is_eog(106) and gemma.is_eog(1) and not gemma.is_eog(2)
    assert gemma.id_to_text(106) == "<end_of_turn>" and gemma.token_type(106) == CONTROL
    assert gemma.token_type(107) == USER_DEFINED and gemma.token_type(9259) == NORMAL
    assert (smollm.bos_id, smollm.eos_id, smollm.eot_id, smollm.add_bos) == (1, 2, 0, False)
    assert smollm.is_eog(2) and smollm.is_eog(0)
    assert (
        gemma.token_to_piece(106) == b""
        and gemma.token_to_piece(106, special=True) == b"<end_of_turn>"
    )
    with pytest.raises(LlmkitError):
        gemma.decode([gemma.n_vocab])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "smollm"])
def test_roundtrip(tokenizer_for, name):
    tok = tokenizer_for(name)
    # SmolLM2 has no byte-level token for a few control bytes; llama.cpp drops them too.
    missing = {b for b, ch in BYTE_TO_UNICODE.items() if ch not in tok.vocab.token_to_id}
    for text in STRINGS + [REFS["documents"][name]]:
        if name == "smollm" and missing.intersection(text.encode()):
            continue
        ids = tok.encode(text, add_special=False, parse_special=False)
        pieces = b"".join(tok.token_to_piece(i, special=True) for i in ids)
        assert pieces == text.encode("utf-8")
        assert tok.decode(ids, special=True) == text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "smollm"])
def test_special_ties_do_not_matter(tokenizer_for, name):
    """llama.cpp sorts special tokens by length with an unstable sort; we keep id order for ties.
    That is only observable if two different special tokens of equal length can overlap."""
    vocab = tokenizer_for(name).vocab
    groups: dict[int, list[str]] = {}
    for i in vocab.special_order:
        groups.setdefault(len(vocab.tokens[i].encode()), []).append(vocab.tokens[i])
    overlaps = []
    for texts in groups.values():
        owners: dict[str, set[str]] = {}
        for t in texts:
            for k in range(1, len(t)):
                owners.setdefault(t[:k], set()).add(t)
        for t in texts:
            for k in range(1, len(t)):
                overlaps += [(t, u) for u in owners.get(t[-k:], ()) if u != t]
    assert not overlaps, overlaps[:5]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "smollm"])
def test_speed_100kb(tokenizer_for, name):
    """Speed is measured, not asserted: time ~100 KB of text on a fresh tokenizer (cold caches),
    once for a document of common words and once for random, mostly unique words."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzàéü中文日本語한국어0123456789.,;!?'()-"
    random_words = " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) for _ in range(20_000)
    )
    doc = REFS["documents"][name]
    for label, text in (("document", doc * 6), ("random words", random_words)):
        text = text[:100_000]
        tok = Tokenizer(tokenizer_for(name).vocab)
        start = time.perf_counter()
        ids = tok.encode(text)
        elapsed = time.perf_counter() - start
        print(f"\n{name} {label}: {len(text)} chars -> {len(ids)} tokens in {elapsed * 1e3:.0f} ms")
        assert ids


# --- tiny vocabularies: llama.cpp's algorithms transcribed ------------------------------------


def ref_bpe_word(word: str, ranks: dict, index: dict, ignore_merges: bool) -> list[int]:
    """llama.cpp llm_tokenizer_bpe_session::tokenize for one byte-encoded pre-token."""
    if ignore_merges and word in index:
        return [index[word]]
    syms = list(word)
    alive = [True] * len(syms)
    prev, nxt = list(range(-1, len(syms) - 1)), list(range(1, len(syms) + 1))
    nxt[-1] = -1
    heap: list = []

    def add(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (syms[left], syms[right]) in ranks:
            heapq.heappush(
                heap, (ranks[syms[left], syms[right]], left, right, syms[left] + syms[right])
            )

    for i in range(1, len(syms)):
        add(i - 1, i)
    while heap:
        _, left, right, text = heapq.heappop(heap)
        if not alive[left] or not alive[right] or syms[left] + syms[right] != text:
            continue
        syms[left], alive[right] = text, False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])
    out = []
    for sym, live in zip(syms, alive, strict=True):
        if live:
            if sym in index:
                out.append(index[sym])
            else:
                out.extend(index[chr(b)] for b in sym.encode() if b < 0x80 and chr(b) in index)
    return out


def bpe_metadata(tokens, merges, pre="gpt-2", types=None, **extra) -> dict:
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types or [NORMAL] * len(tokens), dtype=np.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    md.update({f"tokenizer.ggml.{k}": v for k, v in extra.items()})
    return md


def test_tiny_bpe_by_hand():
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    tokens = ["<|x|>", *alphabet, "Ġh", "Ġhe", "ll", "Ġhell", "o", "<|im_end|>"]
    tokens = list(dict.fromkeys(tokens))
    merges = ["Ġ h", "Ġh e", "l l", "Ġhe ll", "Ġhell o"]  # last result not in vocab
    types = [CONTROL] + [NORMAL] * (len(tokens) - 1)
    tok = load_tokenizer(bpe_metadata(tokens, merges, types=types))
    idx = tokens.index
    # "Ġhello" is formed but is no token: llama.cpp falls back to its single-byte pieces,
    # of which only the ASCII ones exist as tokens ("Ġ" is two bytes in UTF-8 -> dropped)
    assert tok.encode(" hello") == [idx("h"), idx("e"), idx("l"), idx("l"), idx("o")]
    assert tok.encode(" hell") == [idx("Ġhell")]
    assert tok.encode("a<|x|>b") == [idx("a"), 0, idx("b")]
    assert tok.is_eog(0) and tok.is_eog(idx("<|im_end|>")) and tok.eot_id == idx("<|im_end|>")
    assert tok.decode([idx("Ġhell"), idx("o"), 0]) == " hello"
    assert tok.decode([idx("Ġhell"), 0], special=True) == " hell<|x|>"


def test_bpe_merge_parts_outside_the_vocabulary():
    """'abc' is only a merge part, no token: with ignore_merges llama.cpp still merges the word
    ('b c' -> a, bc), HF would take its private id for 'abc' as a whole-word hit."""
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    tokens = [*alphabet, "bc"]
    tok = load_tokenizer(bpe_metadata(tokens, ["b c", "abc d"], pre="llama-bpe"))
    assert tok.encode("abc", add_special=False) == [tokens.index("a"), tokens.index("bc")]
    assert tok.encode("abcd", add_special=False) == [tokens.index(t) for t in ("a", "bc", "d")]


@pytest.mark.parametrize("seed", range(6))
def test_tiny_bpe_matches_llama_algorithm(seed):
    rng = random.Random(seed)
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256) if rng.random() < 0.97 or b == 0x61]
    tokens, merges = list(alphabet), []
    chars = [byte_encode(c) for c in "abc é😀"]
    symbols = list(dict.fromkeys(ch for c in chars for ch in c))
    for _ in range(60):
        left, right = rng.choice(symbols), rng.choice(symbols)
        merges.append(f"{left} {right}")
        symbols.append(left + right)
        if rng.random() < 0.8 and left + right not in tokens:
            tokens.append(left + right)
    index = {t: i for i, t in enumerate(tokens)}
    ranks: dict = {}
    for rank, line in enumerate(merges):
        cut = line.find(" ", 1)
        ranks.setdefault((line[:cut], line[cut + 1 :]), rank)
    ignore = seed % 2 == 1
    tok = load_tokenizer(bpe_metadata(tokens, merges, pre="llama-bpe" if ignore else "gpt-2"))
    for _ in range(200):
        text = "".join(rng.choice("abc é😀!") for _ in range(rng.randint(0, 20)))
        words = tok._engine.splitter.split(text)
        expected = [i for w in words for i in ref_bpe_word(byte_encode(w), ranks, index, ignore)]
        assert tok.encode(text, add_special=False) == expected, text


def test_special_partition_rules():
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    specials = ["<a>", "<ab>", "b>", "<|x|>", "<u>"]
    tokens = [*alphabet, *specials]
    types = [NORMAL] * 256 + [CONTROL, CONTROL, USER_DEFINED, CONTROL, USER_DEFINED]
    tok = load_tokenizer(bpe_metadata(tokens, [], types=types))
    a, ab, b_gt, x, u = (tokens.index(s) for s in specials)
    ch = {c: tokens.index(c) for c in "<abx>|"}
    # longest first: "<ab>" wins over the "b>" inside it; "<a>" then takes what is left
    assert tok.encode("<ab><a>b>") == [ab, a, b_gt]
    assert tok.encode("<|x|><|x|>") == [x, x]
    # parse_special=False still splits user-defined tokens, not control ones
    assert tok.encode("<a><u>", parse_special=False) == [ch["<"], ch["a"], ch[">"], u]
    assert tok.encode("", add_special=True) == []


def test_rstrip_for_phi3_names():
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    tokens = [*alphabet, "<|end|>", "</s>", "<unk>", "<s>", "<|endoftext|>"]
    types = [NORMAL] * 256 + [CONTROL] * 5
    md = bpe_metadata(tokens, [], types=types)
    md["general.name"] = "Phi-3 mini"
    tok = load_tokenizer(md)
    end, eot = tokens.index("<|end|>"), tokens.index("<|endoftext|>")
    sp = tokens.index("Ġ")
    assert tok.encode("<|end|>  \n x") == [end, tokens.index("x")]  # whitespace eaten
    assert tok.encode("<|endoftext|> x") == [eot, sp, tokens.index("x")]  # exempt


def test_flags_and_errors():
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    with pytest.raises(LlmkitError, match="unsupported tokenizer model 'bert'"):
        load_tokenizer({**bpe_metadata(alphabet, []), "tokenizer.ggml.model": "bert"})
    with pytest.raises(LlmkitError, match="pre-tokenizer type 'nope'"):
        load_tokenizer(bpe_metadata(alphabet, [], pre="nope"))
    with pytest.raises(LlmkitError, match="duplicate token"):
        load_tokenizer(bpe_metadata([*alphabet, "a"], []))
    tok = load_tokenizer(bpe_metadata(alphabet, [], pre="llama-bpe", add_eos_token=True))
    assert tok.add_bos and tok.encode("a") == [0, alphabet.index("a"), 0]
    with pytest.raises(LlmkitError, match="not valid Unicode"):
        tok.encode("\ud800")


def test_clean_spaces_and_space_prefix():
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    tok = load_tokenizer(bpe_metadata(alphabet, [], pre="default"))
    ids = tok.encode("Hello , world . It ' s ok ' re don 't")
    assert tok.decode(ids) == "Hello, world. It's ok're don 't"


def test_stl_hash_and_order_match_libstdcxx():
    # values printed by g++ 12 (libstdc++) for std::hash<std::string> / unordered_map iteration
    assert stl_hash(b"") == 6142509188972423790
    assert stl_hash(b"hello") == 2762169579135187400
    assert stl_hash(b"<|im_end|>") == 2038672007907099973
    assert stl_hash("中文".encode()) == 9854956157463167294
    expected = "38,37,36,33,32,39,31,30,29,11,17,7,8,34,5,6,9,19,3,2,1,27,18,13,15,22,12,20,14,4"
    expected += ",21,16,25,35,23,0,24,10,26,28"
    assert iteration_order([f"tok{i}" for i in range(40)]) == [int(x) for x in expected.split(",")]


def test_stl_order_native_equals_python(base_metadata):
    """The native replay (kernels/native/stlmap.c) gives the Python one's order: both real
    vocabularies (49k and 262k keys: eight to fifteen rehashes) and odd keys."""
    for md in base_metadata.values():
        keys = md["tokenizer.ggml.tokens"]
        assert iteration_order(keys) == iteration_order(keys, native=False)
    rng = random.Random(3)
    keys = [
        "",
        "a",
        "\u00e9",
        "\U0001f600",
        *("".join(rng.choice("ab中") for _ in range(rng.randint(1, 20))) for _ in range(3000)),
    ]
    keys = list(dict.fromkeys(keys))
    assert iteration_order(keys) == iteration_order(keys, native=False)
    assert iteration_order(["a\0b", "c"]) == iteration_order(["a\0b", "c"], native=False)
