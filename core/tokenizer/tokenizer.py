"""The Tokenizer: llama.cpp's `llama_tokenize` / `llama_token_to_piece` / `llama_detokenize`.

Encoding splits special-token text out first (partition.py), then hands each raw fragment to the
model tokenizer (spm.py or bpe.py) and adds BOS/EOS per the vocabulary flags. Decoding renders each
token's bytes (control and unknown tokens only when asked) and, for BPE pre-tokenizers that want
it, applies llama.cpp's `clean_spaces` fix-ups.
"""

from __future__ import annotations

import re
from typing import Any

from llmkit.errors import LlmkitError

from .bpe import BpeEngine
from .gemma4 import Gemma4Engine
from .partition import SpecialSplitter
from .spm import SpmEngine
from .unicode import byte_decode
from .vocab import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    Vocab,
    load_vocab,
)

_HIDDEN = ATTR_UNKNOWN | ATTR_CONTROL  # rendered only with special=True
_VERBATIM = _HIDDEN | ATTR_USER_DEFINED
_SPACE_BEFORE_PUNCT = re.compile(rb" (?=[?!.,])")
_SPACE_BEFORE_CONTRACTION = re.compile(rb" (?='[sm]|'re|'ve)")


class Tokenizer:
    """Text <-> token ids with llama.cpp's exact behaviour for one GGUF vocabulary."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._special = SpecialSplitter(vocab)
        self._spm = vocab.model == "llama"
        # llama.cpp's GEMMA4 pre-type (model gemma4, or pre gemma4): pieces carry U+2581 for spaces
        self._escaped = self._spm or vocab.pre == "gemma4"
        if vocab.pre == "gemma4":
            self._engine = Gemma4Engine(vocab)
        else:
            self._engine = SpmEngine(vocab) if self._spm else BpeEngine(vocab)
        self._pieces: dict[int, bytes] = {}

    # --- vocabulary facts ---------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_tokens

    @property
    def bos_id(self) -> int | None:
        return self.vocab.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.vocab.ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self.vocab.ids["eot"]

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    @property
    def eog_ids(self) -> frozenset[int]:
        return self.vocab.eog_ids

    def is_eog(self, token_id: int) -> bool:
        """End of generation: EOS, EOT, EOM and the other end tokens llama.cpp recognises."""
        return token_id in self.vocab.eog_ids

    def id_to_text(self, token_id: int) -> str:
        return self.vocab.tokens[self._check(token_id)]

    def token_type(self, token_id: int) -> int:
        """GGUF token type (1 normal ... 6 byte) after llama.cpp's load-time overrides."""
        return self.vocab.token_type(self._check(token_id))

    # --- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, like `llama_tokenize(vocab, text, add_special, parse_special)`."""
        if not isinstance(text, str):
            raise LlmkitError(f"can only tokenize str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LlmkitError(f"text is not valid Unicode: {e.reason} at {e.start}") from e
        vocab = self.vocab
        out: list[int] = []
        if add_special and vocab.add_bos:
            out.append(vocab.ids["bos"])
        prev_special = True  # SPM: a space prefix goes before the first raw fragment
        for fragment in self._special.split(text, parse_special):
            if isinstance(fragment, int):
                out.append(fragment)
                prev_special = True
            elif self._spm:
                if vocab.add_space_prefix and prev_special:
                    fragment = " " + fragment
                out.extend(self._engine.encode(fragment.replace(" ", "\u2581")))
                prev_special = False
            else:
                out.extend(self._engine.encode(fragment))
        if add_special and vocab.add_eos:
            out.append(vocab.ids["eos"])
        return out

    # --- decoding -----------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """Raw bytes of one token (may be a partial UTF-8 sequence), like `llama_token_to_piece`.

        Control and unknown tokens render as nothing unless `special` is true.
        """
        if not special and self.vocab.attrs[self._check(token_id)] & _HIDDEN:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id)
        return piece

    def detokenize(
        self, ids: list[int], special: bool = False, remove_special: bool = False
    ) -> bytes:
        """Bytes of a token sequence, like `llama_detokenize(remove_special, unparse_special)`."""
        vocab = self.vocab
        ids = list(ids)
        remove_space = vocab.add_space_prefix
        if remove_special and vocab.add_bos and ids and ids[0] == vocab.ids["bos"]:
            remove_space = False
            ids = ids[1:]
        if remove_special and vocab.add_eos and ids and ids[-1] == vocab.ids["eos"]:
            ids = ids[:-1]
        parts = []
        for token_id in ids:
            piece = self.token_to_piece(token_id, special)
            if remove_space and piece.startswith(b" "):
                piece = piece[1:]
            remove_space = False
            parts.append(piece)
        text = b"".join(parts)
        if vocab.clean_spaces:
            text = _clean_spaces(text)
        return text

    def decode(self, ids: list[int], special: bool = False, remove_special: bool = False) -> str:
        """Text of a token sequence (invalid UTF-8 becomes U+FFFD)."""
        return self.detokenize(ids, special, remove_special).decode("utf-8", errors="replace")

    def _render(self, token_id: int) -> bytes:
        """llama.cpp's cached piece of a token (the special=True rendering)."""
        attr = self.vocab.attrs[token_id]
        text = self.vocab.tokens[token_id]
        if attr & _VERBATIM:
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            return (
                text.replace("\u2581", " ").encode("utf-8") if self._escaped else byte_decode(text)
            )
        if attr & ATTR_BYTE:
            return bytes([_hex_byte(text)])
        return b""  # unused / undefined tokens have no text

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab.n_tokens:
            raise LlmkitError(
                f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})"
            )
        return token_id


def _hex_byte(text: str) -> int:
    """`strtol(text.substr(3, 2), 16)` of a `<0xXX>` token: the leading hex digits, else 0."""
    digits = re.match(r"[0-9a-fA-F]*", text[3:5]).group()
    return int(digits, 16) if digits else 0


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's three detokenizer passes: ' ?' -> '?', " ' " -> "'", " 's" -> "'s"."""
    text = _SPACE_BEFORE_PUNCT.sub(b"", text)
    text = text.replace(b" ' ", b"'")
    return _SPACE_BEFORE_CONTRACTION.sub(b"", text)


def load_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """Tokenizer for a GGUF's metadata (`GGUFFile.metadata`)."""
    return Tokenizer(load_vocab(metadata))
