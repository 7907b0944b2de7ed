"""Splitting special-token text out of raw text, as llama.cpp `tokenizer_st_partition` does.

llama.cpp walks its special-token cache longest first; for each token it scans every still-raw
fragment left to right and cuts out each non-overlapping occurrence. Equivalently: an occurrence is
taken when it lies entirely in text no earlier (longer) token took and does not overlap the
previous occurrence taken for the same token. We find occurrences in the whole string and keep the
taken spans in a sorted list, which costs time in proportion to the occurrences instead of
fragments x tokens. A prefix tree first rules out the (thousands of) special tokens that do not
occur at all.
"""

from __future__ import annotations

from bisect import bisect_left

from .vocab import ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN, Vocab

_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale
_HIDDEN_WITHOUT_PARSE = ATTR_CONTROL | ATTR_UNKNOWN


class _Node:
    __slots__ = ("text", "terminal", "children")

    def __init__(self, text: str):
        self.text = text  # full prefix from the root
        self.terminal = False
        self.children: dict[str, _Node] = {}


def _build_tree(texts: list[str]) -> _Node:
    root = _Node("")
    for text in texts:
        node = root
        for i, ch in enumerate(text):
            node = node.children.setdefault(ch, _Node(text[: i + 1]))
        node.terminal = True
    _compress(root)
    return root


def _compress(node: _Node) -> None:
    """Skip chains of single-child, non-terminal nodes so each substring test does real work."""
    for key, child in list(node.children.items()):
        while len(child.children) == 1 and not child.terminal:
            child = next(iter(child.children.values()))
        node.children[key] = child
        _compress(child)


class SpecialSplitter:
    """Splits text into raw pieces (str) and special token ids (int)."""

    def __init__(self, vocab: Vocab):
        self.order = [(i, vocab.tokens[i], vocab.attrs[i]) for i in vocab.special_order]
        texts = [text for _, text, _ in self.order]
        self.tree = _build_tree(texts)

    def _present(self, text: str) -> set[str]:
        found: set[str] = set()
        stack = [self.tree]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if child.text in text:
                    if child.terminal:
                        found.add(child.text)
                    stack.append(child)
        return found

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        if not text:
            return []
        present = self._present(text)
        starts: list[int] = []  # taken spans, sorted and disjoint
        ends: list[int] = []
        ids: list[int] = []
        for token_id, token_text, attr in self.order:
            if token_text not in present or (not parse_special and attr & _HIDDEN_WITHOUT_PARSE):
                continue
            _take_occurrences(text, token_id, token_text, attr, starts, ends, ids)
        out: list[str | int] = []
        pos = 0
        for start, end, token_id in zip(starts, ends, ids, strict=True):
            if start > pos:
                out.append(text[pos:start])
            out.append(token_id)
            pos = end
        if pos < len(text):
            out.append(text[pos:])
        return out


def _take_occurrences(text, token_id, token_text, attr, starts, ends, ids) -> None:
    length = len(token_text)
    resume = 0  # llama.cpp continues after the previous match in the same fragment
    pos = text.find(token_text)
    while pos != -1:
        end = pos + length
        slot = bisect_left(starts, end)
        if pos >= resume and (slot == 0 or ends[slot - 1] <= pos):
            gap_start = ends[slot - 1] if slot else 0
            gap_end = starts[slot] if slot < len(starts) else len(text)
            start = pos
            if attr & ATTR_LSTRIP:  # the stripped spaces vanish with the token
                while start > gap_start and text[start - 1] in _C_SPACE:
                    start -= 1
            if attr & ATTR_RSTRIP:
                while end < gap_end and text[end] in _C_SPACE:
                    end += 1
            starts.insert(slot, start)
            ends.insert(slot, end)
            ids.insert(slot, token_id)
            resume = end
            pos = text.find(token_text, max(end, pos + 1))
        else:
            pos = text.find(token_text, pos + 1)
