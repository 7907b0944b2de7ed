"""BPE (`tokenizer.ggml.model = gpt2`) tokenization of raw text fragments, on HF `tokenizers`.

llama.cpp splits a fragment into pre-tokens with the pre-tokenizer's regexes (see pretok.py),
byte-encodes each one (GPT-2 table), and runs rank-ordered BPE merges inside each pre-token (lowest
rank first, ties leftmost); a final symbol that is no token becomes the tokens of its single bytes
when those exist, otherwise it is dropped. The regex splitting is ours; the merges run in HF's Rust
BPE, given the words already split (`is_pretokenized`), whose merge order is the same.

Two gaps between the libraries are closed here:
* HF rejects merges whose parts or result are not in the vocabulary, and silently drops characters
  that are not, which would let their neighbours merge. llama.cpp keeps such symbols (they block
  merges) and only resolves them at the end. We give every such string a private id above the
  vocabulary and translate it afterwards with llama.cpp's single-byte fallback.
* Duplicate merges: llama.cpp keeps the first rank, HF the last -> duplicates are dropped.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers

from .pretok import RegexSplitter
from .unicode import BYTE_TO_UNICODE, byte_encode
from .vocab import Vocab

_CACHE_LIMIT = 200_000


class BpeEngine:
    """Tokenizes one raw fragment into token ids."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.splitter = RegexSplitter(vocab.pre_tokenizer.regexes)
        hf_vocab = dict(vocab.token_to_id)
        extras: list[str] = []

        def ensure(text: str) -> None:
            if text not in hf_vocab:
                hf_vocab[text] = vocab.n_tokens + len(extras)
                extras.append(text)

        merges = []
        seen = set()
        for line in vocab.merges:
            cut = line.find(" ", 1)
            left, right = (line[:cut], line[cut + 1 :]) if cut >= 0 else ("", "")
            if not left or not right or (left, right) in seen:
                continue  # unusable (symbols are never empty) or shadowed by an earlier rank
            seen.add((left, right))
            merges.append((left, right))
            for text in (left, right, left + right):
                ensure(text)
        for ch in BYTE_TO_UNICODE.values():
            ensure(ch)
        self.fallback = [self._byte_fallback(text) for text in extras]
        self.hf = _hf_tokenizer(hf_vocab, merges, vocab.ignore_merges)
        # ignore_merges looks a whole pre-token up in the vocabulary; our private ids are not in
        # llama.cpp's, so such words take the model without the shortcut.
        self.extras = set(extras) if vocab.ignore_merges else set()
        self.hf_merge_only = _hf_tokenizer(hf_vocab, merges, False) if self.extras else None
        self._cache: dict[str, list[int]] = {}  # pre-token -> ids; words repeat a lot

    def _byte_fallback(self, text: str) -> list[int]:
        """llama.cpp for a symbol that is no token: each UTF-8 byte as a one-byte token, if any."""
        out = []
        for byte in text.encode("utf-8"):
            token_id = self.vocab.token_to_id.get(chr(byte)) if byte < 0x80 else None
            if token_id is not None:
                out.append(token_id)
        return out

    def encode(self, text: str) -> list[int]:
        words = self.splitter.split(text)
        cache = self._cache
        unique = dict.fromkeys(words)
        if len(cache) + len(unique) > _CACHE_LIMIT:
            cache.clear()
        fresh = [w for w in unique if w not in cache]
        if fresh:
            self._encode_words(fresh)
        out: list[int] = []
        for word in words:
            out.extend(cache[word])
        return out

    def _encode_words(self, words: list[str]) -> None:
        """BPE of distinct pre-tokens in one HF call, stored per word in the cache."""
        if self.extras:
            special = {w for w in words if byte_encode(w) in self.extras}
            if special:
                self._encode_with(self.hf_merge_only, list(special))
                words = [w for w in words if w not in special]
        if words:
            self._encode_with(self.hf, words)

    def _encode_with(self, hf: Tokenizer, words: list[str]) -> None:
        encoding = hf.encode(words, is_pretokenized=True, add_special_tokens=False)
        per_word: list[list[int]] = [[] for _ in words]
        n = self.vocab.n_tokens
        for token_id, word_index in zip(encoding.ids, encoding.word_ids, strict=True):
            if token_id < n:
                per_word[word_index].append(token_id)
            else:
                per_word[word_index].extend(self.fallback[token_id - n])
        self._cache.update(zip(words, per_word, strict=True))


def _hf_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], ignore_merges: bool):
    """HF BPE without normalizer or unknown token, GPT-2 byte mapping of pre-split words."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tokenizer
