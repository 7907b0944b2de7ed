"""SPM (`tokenizer.ggml.model = llama`) tokenization of raw text fragments: llama.cpp's
llm_tokenizer_spm.

Split the fragment into UTF-8 characters; merge the adjacent pair whose concatenation is the
highest-scoring vocabulary token (ties: leftmost), repeat; a leftover character that is no token
becomes its byte tokens (`<0xXX>`, else the byte itself for ASCII, as llama.cpp's byte_to_token).
Any token can be merged into, whatever its type (the special-token split has already removed the
text of control and user-defined tokens that must not be).

The merge loop runs natively (kernels/native/spm.c, through the package's native library: a hash
of the token texts, ~8 MB for Gemma 3's 262k tokens) or, without the library, in Python (the
same algorithm, slower on long documents).
"""

from __future__ import annotations

import ctypes
import heapq
import weakref

import numpy as np

from llmkit.errors import LlmkitError
from llmkit.native_lib import load_library

from .vocab import Vocab

_UTF8_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)  # by the lead byte's high nibble


def _native():
    """The library's SPM functions with their signatures, or None."""
    lib, _ = load_library()  # the kernels' library: core may use it directly (native_lib)
    if lib is None or not hasattr(lib, "llk_spm_encode"):
        return None
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.llk_spm_new.restype, lib.llk_spm_new.argtypes = vp, [ctypes.c_char_p, i64, i64, vp]
    lib.llk_spm_free.restype, lib.llk_spm_free.argtypes = None, [vp]
    lib.llk_spm_encode.restype = i64
    lib.llk_spm_encode.argtypes = [vp, ctypes.c_char_p, i64, vp, vp, i64, vp]
    return lib


class SpmEngine:
    """Tokenizes one raw fragment (spaces already escaped to U+2581) into token ids."""

    def __init__(self, vocab: Vocab, native: bool = True):
        self.vocab = vocab
        ids = [self._byte_id(b) for b in range(256)]  # -1: no byte token
        self._byte_ids = np.array(ids, dtype=np.int32)
        self._lib = _native() if native else None
        if self._lib is None:
            return
        texts = "\0".join(vocab.tokens).encode("utf-8")  # token texts hold no NUL (vocab.py)
        scores = np.ascontiguousarray(vocab.scores, dtype=np.float32)
        h = self._lib.llk_spm_new(texts, len(texts), vocab.n_tokens, scores.ctypes.data)
        if not h:
            raise LlmkitError("cannot build the SPM tokenizer (out of memory?)")
        self._h = h
        weakref.finalize(self, self._lib.llk_spm_free, h)

    def _byte_id(self, byte: int) -> int:
        token_id = self.vocab.token_to_id.get(f"<0x{byte:02X}>")
        if token_id is None and byte < 0x80:
            token_id = self.vocab.token_to_id.get(chr(byte))
        return -1 if token_id is None else token_id

    def byte_token(self, byte: int) -> int:
        """llama.cpp `byte_to_token` for SPM: `<0xXX>`, else the byte itself as a token."""
        token_id = int(self._byte_ids[byte])
        if token_id < 0:
            raise LlmkitError(f"vocabulary has no byte token for 0x{byte:02X}")
        return token_id

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if self._lib is None:
            return self._encode_py(data)
        out = np.empty(len(data), dtype=np.int32)
        bad = ctypes.c_int32(0)
        n = self._lib.llk_spm_encode(self._h, data, len(data), self._byte_ids.ctypes.data,
                                     out.ctypes.data, len(data), ctypes.byref(bad))  # fmt: skip
        if n == -1:  # LLK_E_TYPE: a byte without a byte token
            raise LlmkitError(f"vocabulary has no byte token for 0x{bad.value:02X}")
        if n < 0:
            raise LlmkitError("SPM tokenization failed: out of memory")
        return out[:n].tolist()

    def _encode_py(self, data: bytes) -> list[int]:
        """The same algorithm in Python (no native library)."""
        index, scores = self.vocab.token_to_id, self.vocab.scores
        start, size, pos = [], [], 0
        while pos < len(data):
            n = min(_UTF8_LEN[data[pos] >> 4], len(data) - pos)
            start.append(pos)
            size.append(n)
            pos += n
        n_sym = len(start)
        prev, nxt = list(range(-1, n_sym - 1)), [*range(1, n_sym), -1]
        heap: list = []

        def text(i: int, n: int) -> str | None:
            try:
                return data[start[i] : start[i] + n].decode("utf-8")
            except UnicodeDecodeError:  # a clipped character: no token holds it
                return None

        def add(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                n = size[left] + size[right]
                token_id = index.get(text(left, n))
                if token_id is not None:
                    heapq.heappush(heap, (-float(scores[token_id]), left, right, n))

        for i in range(1, n_sym):
            add(i - 1, i)
        while heap:
            _, left, right, n = heapq.heappop(heap)
            if not size[left] or not size[right] or size[left] + size[right] != n:
                continue
            size[left], size[right] = n, 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out, i = [], 0 if n_sym else -1
        while i >= 0:
            token_id = index.get(text(i, size[i]))
            if token_id is not None:
                out.append(token_id)
            else:
                out.extend(self.byte_token(b) for b in data[start[i] : start[i] + size[i]])
            i = nxt[i]
        return out
