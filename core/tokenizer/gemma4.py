"""Gemma 4 tokenization (`tokenizer.ggml.model = gemma4`): SentencePiece-style BPE, as llama.cpp's
BPE session with the GEMMA4 pre-type runs it.

Spaces are escaped to U+2581 first; the text is split only into runs of newlines and runs of
everything else (`[^\\n]+|[\\n]+`); a run of newlines that is itself a token is emitted whole.
Inside a run the symbols are the raw UTF-8 characters (no GPT-2 byte mapping), merged by rank
(lowest rank first, leftmost on ties; the first rank of a duplicated merge counts). A final symbol
that is no token becomes the `<0xXX>` tokens of its bytes (bytes without one are dropped).
"""

from __future__ import annotations

import heapq
import re

from .vocab import Vocab

_RUNS = re.compile(r"[^\n]+|\n+")
_CACHE_LIMIT = 100_000


class Gemma4Engine:
    """Tokenizes one raw fragment into token ids."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, line in enumerate(vocab.merges):
            cut = line.find(" ", 1)
            pair = (line[:cut], line[cut + 1 :]) if cut >= 0 else ("", "")
            self.ranks.setdefault(pair, rank)  # llama.cpp's map emplace keeps the first
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for run in _RUNS.findall(text.replace(" ", "\u2581")):
            ids = self._cache.get(run)
            if ids is None:
                if len(self._cache) > _CACHE_LIMIT:
                    self._cache.clear()
                ids = self._cache[run] = self._encode_run(run)
            out.extend(ids)
        return out

    def _encode_run(self, run: str) -> list[int]:
        t2i = self.vocab.token_to_id
        if run[0] == "\n" and run in t2i:
            return [t2i[run]]
        return [i for sym in self._merge(run) for i in self._ids(sym)]

    def _merge(self, word: str) -> list[str]:
        """llama.cpp's bigram queue over the characters of `word`."""
        syms = list(word)
        nxt = list(range(1, len(syms))) + [-1]
        prv = list(range(-1, len(syms) - 1))
        heap: list[tuple[int, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            rank = self.ranks.get((syms[left], syms[right]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(len(syms) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != text:
                continue  # outdated bigram
            if nxt[left] != right:
                continue
            syms[left], syms[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        return [s for s in syms if s]

    def _ids(self, sym: str) -> list[int]:
        t2i = self.vocab.token_to_id
        token = t2i.get(sym)
        if token is not None:
            return [token]
        out = []
        for byte in sym.encode("utf-8"):
            token = t2i.get(f"<0x{byte:02X}>")
            if token is not None:
                out.append(token)
        return out
