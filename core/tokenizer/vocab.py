"""Vocabulary from GGUF metadata, built the way llama.cpp's `llama_vocab::impl::load` builds it.

Besides tokens, scores and types this resolves what llama.cpp derives at load time: default and
metadata special ids, add_bos/add_eos/add_space_prefix and the pre-tokenizer flags, text-based
detection of EOT/EOM/FIM tokens (forcing them to control type), the end-of-generation set, and the
"special cache" (control, user-defined and unknown tokens, longest first) that is split out of
text before the model tokenizer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmkit.errors import LlmkitError

from .pretok import PreTokenizer, pre_tokenizer
from .stlmap import iteration_order

# GGUF token types.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

# llama.cpp token attributes (bit flags).
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_TYPE_ATTR = {
    NORMAL: ATTR_NORMAL,
    UNKNOWN: ATTR_UNKNOWN,
    CONTROL: ATTR_CONTROL,
    USER_DEFINED: ATTR_USER_DEFINED,
    UNUSED: ATTR_UNUSED,
    BYTE: ATTR_BYTE,
}
# Effective GGUF type of an attribute set, most significant first.
_ATTR_TYPE = [
    (ATTR_USER_DEFINED, USER_DEFINED),
    (ATTR_CONTROL, CONTROL),
    (ATTR_UNKNOWN, UNKNOWN),
    (ATTR_BYTE, BYTE),
    (ATTR_UNUSED, UNUSED),
    (ATTR_NORMAL, NORMAL),
]

SPECIAL_ATTRS = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN

# Texts llama.cpp recognises, per special role, when the GGUF does not name the id.
_DETECT = {
    "eot": (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
        "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ),
    "eom": ("<|eom_id|>",),
    "fim_pre": (
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
        "<|code_prefix|>", "<|prefix|>",
    ),
    "fim_suf": (
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
        "<|code_suffix|>", "<|suffix|>",
    ),
    "fim_mid": (
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
        "<|code_middle|>", "<|middle|>",
    ),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_EOG_TEXTS = frozenset(
    [
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
        "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
        "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
    ]
)  # fmt: skip
_ROLE_KEYS = {
    "bos": ("bos_token_id",),
    "eos": ("eos_token_id",),
    "eot": ("eot_token_id",),
    "eom": ("eom_token_id",),
    "unk": ("unknown_token_id",),
    "sep": ("seperator_token_id",),  # sic: the GGUF key is misspelled
    "pad": ("padding_token_id",),
    "mask": ("mask_token_id",),
    "fim_pre": ("fim_pre_token_id", "prefix_token_id"),
    "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
    "fim_mid": ("fim_mid_token_id", "middle_token_id"),
    "fim_pad": ("fim_pad_token_id",),
    "fim_rep": ("fim_rep_token_id",),
    "fim_sep": ("fim_sep_token_id",),
}
_PREFIX = "tokenizer.ggml."


@dataclass
class Vocab:
    """Everything llama.cpp knows about a vocabulary after loading it."""

    model: str  # 'llama' (SPM) or 'gpt2' (BPE)
    pre: str
    tokens: list[str]
    scores: np.ndarray
    attrs: list[int]
    token_to_id: dict[str, int]
    merges: list[str]
    ids: dict[str, int | None]  # role -> id (bos, eos, eot, eom, unk, sep, pad, mask, fim_*)
    eog_ids: frozenset[int] = frozenset()
    add_bos: bool = False
    add_eos: bool = False
    add_sep: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    ignore_merges: bool = False
    pre_tokenizer: PreTokenizer | None = None
    special_order: list[int] = field(default_factory=list)  # llama.cpp cache_special_tokens

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def token_type(self, token_id: int) -> int:
        """GGUF type that matches the token's llama.cpp attributes (after load-time overrides)."""
        attr = self.attrs[token_id]
        for flag, gguf_type in _ATTR_TYPE:
            if attr & flag:
                return gguf_type
        return UNDEFINED


MAX_TOKENS = 1 << 24  # a vocabulary past 16M tokens is a lie sized to exhaust memory


def _check_types(md: dict[str, Any]) -> None:
    """The tokenizer keys as llama.cpp requires them (it throws on a wrong type): strings where
    strings belong, the token list an array of strings, scores an array of floats, types and
    special ids integers, merges an array of strings. One line naming the key otherwise."""

    def fail(key: str, want: str, v: Any) -> None:
        found = f"array of {v.dtype.name}" if isinstance(v, np.ndarray) else type(v).__name__
        raise LlmkitError(f"GGUF metadata tokenizer.ggml.{key} must be {want}, found {found}")

    for key in ("model", "pre"):
        v = md.get(_PREFIX + key)
        if v is not None and not isinstance(v, str):
            fail(key, "a string", v)
    for key in ("tokens", "merges"):
        v = md.get(_PREFIX + key)
        if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            fail(key, "an array of strings", v)
    tokens = md.get(_PREFIX + "tokens")
    if tokens is not None and len(tokens) > MAX_TOKENS:
        raise LlmkitError(f"tokenizer.ggml.tokens has {len(tokens)} entries (at most {MAX_TOKENS})")
    for key, kinds in (("scores", "fc"), ("token_type", "iu")):
        v = md.get(_PREFIX + key)
        if v is not None and not (isinstance(v, np.ndarray) and v.dtype.kind in kinds):
            fail(key, "an array of " + ("floats" if kinds == "fc" else "integers"), v)
    for keys in _ROLE_KEYS.values():
        for key in keys:
            v = md.get(_PREFIX + key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                fail(key, "an integer", v)
    for key in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix"):
        v = md.get(_PREFIX + key)
        if v is not None and not isinstance(v, (bool, np.bool_)):
            fail(key, "a bool", v)


def load_vocab(md: dict[str, Any]) -> Vocab:
    """Build a Vocab from GGUF metadata (`GGUFFile.metadata`)."""
    _check_types(md)
    model = md.get(_PREFIX + "model")
    if model is None:
        raise LlmkitError("GGUF has no tokenizer.ggml.model: cannot build a tokenizer")
    if model not in ("llama", "gpt2", "gemma4"):
        raise LlmkitError(
            f"unsupported tokenizer model {model!r} (supported: 'llama', 'gpt2', 'gemma4')"
        )
    if model in ("gpt2", "gemma4") and _PREFIX + "merges" not in md:
        raise LlmkitError("GGUF BPE vocabulary has no tokenizer.ggml.merges")
    tokens = _token_texts(md)
    n = len(tokens)
    token_to_id = _index(tokens, later_wins=model == "gemma4")
    scores = np.asarray(md.get(_PREFIX + "scores", np.zeros(n)), dtype=np.float32)
    types = md.get(_PREFIX + "token_type")
    if len(scores) < n or (types is not None and len(types) < n):
        raise LlmkitError("tokenizer scores/token_type arrays are shorter than the token list")
    scores = scores[:n]
    if types is None:
        attrs = [ATTR_NORMAL] * n
    else:  # unknown type numbers are "undefined" (attribute 0)
        table = np.array([_TYPE_ATTR.get(t, 0) for t in range(8)])
        codes = np.asarray(types[:n], dtype=np.int64)
        attrs = table[np.where((codes >= 0) & (codes < 8), codes, 0)].tolist()

    # gemma4: llama.cpp forces the pre-type whatever the file says
    pre_name = {"gpt2": md.get(_PREFIX + "pre", ""), "gemma4": "gemma4"}.get(model, "default")
    vocab = Vocab(
        model=model,
        pre=pre_name or "default",
        tokens=tokens,
        scores=scores,
        attrs=attrs,
        token_to_id=token_to_id,
        merges=list(md.get(_PREFIX + "merges", [])) if model != "llama" else [],
        ids={},
    )
    _set_flags(vocab, md)
    _set_special_ids(vocab, md)
    _detect_by_text(vocab)
    _set_eog(vocab)
    vocab.special_order = _special_cache(vocab)
    _set_strip_attrs(vocab, md)
    return vocab


def _token_texts(md: dict[str, Any]) -> list[str]:
    raw = md.get(_PREFIX + "tokens")
    if raw is None or len(raw) == 0:
        raise LlmkitError("GGUF has no tokenizer.ggml.tokens: cannot build a tokenizer")
    texts = list(raw)
    if "\0" in "".join(texts) or "" in texts:
        for i, text in enumerate(texts):
            text = text.split("\0", 1)[0]  # llama.cpp reads tokens as C strings
            texts[i] = text if text else f"[EMPTY_{i}]"
    return texts


def _index(tokens: list[str], later_wins: bool = False) -> dict[str, int]:
    """Text -> id. A duplicated text is an error, except where llama.cpp's map is known to meet
    them (`later_wins`: Gemma 4's vocabulary repeats a few texts; the later id stays)."""
    token_to_id = dict(zip(tokens, range(len(tokens)), strict=True))
    if len(token_to_id) != len(tokens) and not later_wins:
        first: dict[str, int] = {}
        for i, text in enumerate(tokens):
            if first.setdefault(text, i) != i:
                raise LlmkitError(
                    f"duplicate token in vocabulary: {text!r} has ids {first[text]} and {i}"
                )
    return token_to_id


def _set_flags(vocab: Vocab, md: dict[str, Any]) -> None:
    if vocab.model == "llama":
        vocab.add_space_prefix, vocab.add_bos = True, True
        vocab.ids.update(bos=1, eos=2, unk=0)
    else:
        spec = pre_tokenizer(vocab.pre)
        vocab.pre_tokenizer = spec
        vocab.clean_spaces = spec.clean_spaces
        vocab.ignore_merges = spec.ignore_merges
        vocab.add_bos = spec.add_bos
        vocab.add_sep = spec.add_sep
        vocab.ids.update(bos=None if spec.no_bos else 11, eos=11)
        if vocab.model == "gemma4":  # no default ids: they come from the file
            vocab.ids.update(bos=None, eos=None, unk=None)
    vocab.add_space_prefix = bool(md.get(_PREFIX + "add_space_prefix", vocab.add_space_prefix))
    vocab.add_bos = bool(md.get(_PREFIX + "add_bos_token", vocab.add_bos))
    vocab.add_eos = bool(md.get(_PREFIX + "add_eos_token", vocab.add_eos))
    vocab.add_sep = bool(md.get(_PREFIX + "add_sep_token", vocab.add_sep))


def _set_special_ids(vocab: Vocab, md: dict[str, Any]) -> None:
    n = vocab.n_tokens
    for role, keys in _ROLE_KEYS.items():
        current = vocab.ids.get(role)
        if current is not None and current >= n:  # a default outside the vocab is dropped
            current = None
        for key in keys:
            value = md.get(_PREFIX + key)
            if isinstance(value, (int, np.integer)) and 0 <= int(value) < n:
                current = int(value)
        vocab.ids[role] = current
    for flag, role in (("add_bos", "bos"), ("add_eos", "eos"), ("add_sep", "sep")):
        if getattr(vocab, flag) and vocab.ids[role] is None:
            raise LlmkitError(
                f"tokenizer.ggml.{flag}_token is true but the {role} token id is not set"
            )


def _detect_by_text(vocab: Vocab) -> None:
    """EOT/EOM/FIM detection by token text; the first hit in llama.cpp's hash-map order wins."""
    rank: list[int] | None = None
    for role, texts in _DETECT.items():
        if vocab.ids.get(role) is not None:
            continue
        hits = [vocab.token_to_id[t] for t in texts if t in vocab.token_to_id]
        if not hits:
            continue
        if len(hits) > 1 and rank is None:
            rank = _map_positions(vocab.tokens)
        chosen = hits[0] if len(hits) == 1 else min(hits, key=rank.__getitem__)
        vocab.ids[role] = chosen
        vocab.attrs[chosen] |= ATTR_CONTROL
    for i, text in enumerate(vocab.tokens):  # control tokens named "unused" are unused
        if vocab.attrs[i] & ATTR_CONTROL and "unused" in text:
            vocab.attrs[i] |= ATTR_UNUSED


def _map_positions(tokens: list[str]) -> list[int]:
    """Position of each token id when llama.cpp iterates `token_to_id` (id order if unknown)."""
    order = iteration_order(tokens) or range(len(tokens))
    position = [0] * len(tokens)
    for pos, token_id in enumerate(order):
        position[token_id] = pos
    return position


def _set_eog(vocab: Vocab) -> None:
    ids, attrs, tokens = vocab.ids, vocab.attrs, vocab.tokens
    eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids[r] is not None}
    for text in _EOG_TEXTS:
        token_id = vocab.token_to_id.get(text)
        if token_id is not None:
            eog.add(token_id)
            attrs[token_id] |= ATTR_CONTROL
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
        if text in vocab.token_to_id:
            attrs[vocab.token_to_id[text]] = ATTR_USER_DEFINED
    eog.update(ids[r] for r in ("eos", "eot", "eom") if ids[r] is not None)
    texts = {tokens[i]: i for i in eog}
    # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
    has = texts.__contains__
    has_call = has("<|call|>") or has("<|calls|>")
    if has("<|end|>") and has_call and (has("<|return|>") or has("<|flush|>")):
        eog.discard(texts["<|end|>"])
        attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
    if has("<|tool_response>") and has("</s>"):  # gemma4 / paddleocr
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = ATTR_NORMAL
    vocab.eog_ids = frozenset(eog)


def _special_cache(vocab: Vocab) -> list[int]:
    """Control, user-defined and unknown tokens, longest (in UTF-8 bytes) first.

    llama.cpp uses the unstable std::sort; equal lengths only matter when two such tokens overlap
    in the text, which real vocabularies avoid, so ties keep id order here.
    """
    special = [i for i, a in enumerate(vocab.attrs) if a & SPECIAL_ATTRS]
    return sorted(special, key=lambda i: -len(vocab.tokens[i].encode("utf-8")))


def _set_strip_attrs(vocab: Vocab, md: dict[str, Any]) -> None:
    """Per-model lstrip/rstrip attributes llama.cpp sets by model, tokenizer or arch name."""
    name = str(md.get("general.name", "")).lower()
    arch = str(md.get("general.architecture", ""))
    pre = str(md.get(_PREFIX + "pre", ""))

    def set_attr(text: str, flag: int, on: bool) -> None:
        if text not in vocab.token_to_id:
            raise LlmkitError(f"token {text!r} missing from vocabulary")
        token_id = vocab.token_to_id[text]
        vocab.attrs[token_id] = (
            vocab.attrs[token_id] | flag if on else vocab.attrs[token_id] & ~flag
        )

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in vocab.token_to_id:
            set_attr("<mask>", ATTR_LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for token_id in vocab.special_order:
            vocab.attrs[token_id] |= ATTR_RSTRIP
        set_attr("</s>", ATTR_RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            set_attr(text, ATTR_RSTRIP, False)
    elif "modern-bert" in name and "[MASK]" in vocab.token_to_id:
        set_attr("[MASK]", ATTR_LSTRIP, True)
