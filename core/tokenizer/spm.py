"""SPM (`tokenizer.ggml.model = llama`) tokenization of raw text fragments, on `sentencepiece`.

llama.cpp's SPM tokenizer is sentencepiece's BPE algorithm: split into UTF-8 characters, merge the
adjacent pair whose concatenation is the highest-scoring vocabulary token (ties: leftmost), repeat;
a leftover character that is no token becomes its `<0xXX>` byte tokens. Sentencepiece runs the
same loop in C++, with differences we remove when building its model in memory:

* llama.cpp can merge into *any* token, while sentencepiece only merges into normal, user-defined
  and unused pieces, freezes user-defined pieces and re-splits unused ones -> every GGUF token is
  declared NORMAL (user-defined text never reaches this stage: the special-token split removed it).
* sentencepiece needs exactly one UNKNOWN piece -> an extra piece after the vocabulary, named so it
  cannot occur; an unknown character comes back with that id and we apply llama.cpp's byte fallback.
* no normalization, no dummy prefix, no whitespace handling (done by the caller as llama.cpp does).

The ModelProto is serialized by hand (protobuf wire format) since `google.protobuf` is optional.
"""

from __future__ import annotations

import struct

import numpy as np
import sentencepiece

from llmkit.errors import LlmkitError

from .vocab import Vocab

_NORMAL, _UNKNOWN, _BPE = 1, 2, 2


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are sign-extended to 64 bits
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


_SMALL = [bytes([i]) for i in range(128)]  # one-byte varints, the common case below


def _piece(text: bytes, score4: bytes, piece_type: int) -> bytes:
    """One ModelProto.pieces entry: piece (1), score (2, fixed32), type (3)."""
    n = len(text)
    body = b"\x0a" + (_SMALL[n] if n < 128 else _varint(n)) + text + b"\x15" + score4
    body += b"\x18" + _SMALL[piece_type]
    m = len(body)
    return b"\x0a" + (_SMALL[m] if m < 128 else _varint(m)) + body


def model_proto(tokens: list[str], scores: np.ndarray, unk_piece: str) -> bytes:
    """Serialized sentencepiece ModelProto: all tokens NORMAL, plus one UNKNOWN piece at the end."""
    packed = np.asarray(scores, dtype="<f4").tobytes()
    parts = [
        _piece(text.encode("utf-8"), packed[4 * i : 4 * i + 4], _NORMAL)
        for i, text in enumerate(tokens)
    ]
    parts.append(_piece(unk_piece.encode("utf-8"), struct.pack("<f", 0.0), _UNKNOWN))
    trainer = b"".join(
        [
            _int_field(3, _BPE),  # model_type
            _int_field(4, len(tokens) + 1),  # vocab_size
            _int_field(35, 0),  # byte_fallback: done by us
            _int_field(40, len(tokens)),  # unk_id
            _int_field(41, -1),  # bos_id
            _int_field(42, -1),  # eos_id
            _int_field(43, -1),  # pad_id
            _bytes_field(45, unk_piece.encode("utf-8")),  # unk_piece
        ]
    )
    normalizer = b"".join(
        [
            _bytes_field(1, b"identity"),  # name
            _int_field(3, 0),  # add_dummy_prefix
            _int_field(4, 0),  # remove_extra_whitespaces
            _int_field(5, 0),  # escape_whitespaces
        ]
    )
    parts.append(_bytes_field(2, trainer))
    parts.append(_bytes_field(3, normalizer))
    return b"".join(parts)


class SpmEngine:
    """Tokenizes one raw fragment (spaces already escaped to U+2581) into token ids."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        unk_piece = "<llmkit:unknown>"
        while unk_piece in vocab.token_to_id:
            unk_piece += "~"
        self.unk_id = vocab.n_tokens
        try:
            self.sp = sentencepiece.SentencePieceProcessor(
                model_proto=model_proto(vocab.tokens, vocab.scores, unk_piece)
            )
        except (RuntimeError, OSError) as e:
            raise LlmkitError(f"cannot build the SPM tokenizer: {e}") from e
        self._byte_ids: dict[int, int] = {}

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        if self.unk_id not in ids:
            return ids
        pieces = self.sp.encode(text, out_type=str)  # same segmentation, with the surface text
        out: list[int] = []
        for token_id, piece in zip(ids, pieces, strict=True):
            if token_id == self.unk_id:
                out.extend(self.byte_token(b) for b in piece.encode("utf-8"))
            else:
                out.append(token_id)
        return out

    def byte_token(self, byte: int) -> int:
        """llama.cpp `byte_to_token` for SPM: `<0xXX>`, else the byte itself as a token."""
        token_id = self._byte_ids.get(byte)
        if token_id is None:
            token_id = self.vocab.token_to_id.get(f"<0x{byte:02X}>")
            if token_id is None and byte < 0x80:
                token_id = self.vocab.token_to_id.get(chr(byte))
            if token_id is None:
                raise LlmkitError(f"vocabulary has no byte token for 0x{byte:02X}")
            self._byte_ids[byte] = token_id
        return token_id
