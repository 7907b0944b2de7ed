"""Unicode facts the way llama.cpp's `unicode.cpp` sees them.

llama.cpp classifies every code point once (generated with the `regex` module: \\p{N}, \\p{L}, \\p{Z},
\\p{M}, \\p{P}, \\p{S}, \\p{C}, and `\\s` for whitespace). Its pre-tokenizer regexes run on a
"collapsed" copy of the text where each non-ASCII code point is replaced by one byte naming its
category; we build the same collapsed string so Python's `re` sees exactly what `std::regex` sees.

The byte-level (GPT-2) tables map each byte to a printable code point and back.
"""

from __future__ import annotations

import unicodedata

try:  # the same library llama.cpp generated its tables with, usually a newer Unicode than stdlib
    import regex as _regex
except ImportError:  # pragma: no cover - stdlib fallback, Unicode version of this Python
    _regex = None

# White_Space code points (llama.cpp `unicode_set_whitespace`).
WHITESPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

# Category letter -> collapsed representative (llama.cpp `k_ucat_cpt`); others collapse to 0xD0.
COLLAPSED = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
COLLAPSED_FALLBACK = "\xd0"
COLLAPSED_WHITESPACE = "\x0b"  # std::regex `\s` only knows ASCII whitespace

# ASCII members of each category inside a collapsed character class (llama.cpp `k_ucat_map`;
# newer llama.cpp, which our references come from, counts '~' as a symbol too).
CATEGORY_ASCII = {
    "N": "0-9",
    "L": "A-Za-z",
    "P": "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    "M": "",
    "S": "\\$\\+<->\\^`\\|~",
}

if _regex is not None:
    _CAT_PATTERNS = [(c, _regex.compile(rf"\p{{{c}}}")) for c in ("N", "L", "Z", "M", "P", "S")]


def category(ch: str) -> str:
    """Major general category of one character: one of N L Z M P S C."""
    if _regex is not None:
        for name, pattern in _CAT_PATTERNS:
            if pattern.match(ch):
                return name
        return "C"
    return unicodedata.category(ch)[0]


class _CollapseTable(dict):
    """`str.translate` table: ASCII stays, other code points become their category byte."""

    def __missing__(self, cp: int) -> str:
        if cp in WHITESPACE:
            value = COLLAPSED_WHITESPACE
        else:
            value = COLLAPSED.get(category(chr(cp)), COLLAPSED_FALLBACK)
        self[cp] = value
        return value


_COLLAPSE_TABLE = _CollapseTable({cp: cp for cp in range(128)})


class _WhitespaceTable(dict):
    """`str.translate` table for std::wregex input: non-ASCII whitespace becomes \\v."""

    def __missing__(self, cp: int) -> int:
        value = 0x0B if cp in WHITESPACE and cp > 0x7F else cp
        self[cp] = value
        return value


_WS_TABLE = _WhitespaceTable()


def collapse(text: str) -> str:
    """The collapsed text llama.cpp matches category regexes against (one char per code point)."""
    return text.translate(_COLLAPSE_TABLE)


def ascii_whitespace(text: str) -> str:
    """The text llama.cpp matches category-free regexes against (std::wregex)."""
    return text.translate(_WS_TABLE)


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {ch: b for b, ch in BYTE_TO_UNICODE.items()}
_BYTE_ENCODE_TABLE = [BYTE_TO_UNICODE[b] for b in range(256)]


def byte_encode(text: str) -> str:
    """GPT-2 byte-level view of a string: each UTF-8 byte becomes one printable code point."""
    return "".join(_BYTE_ENCODE_TABLE[b] for b in text.encode("utf-8"))


def byte_decode(token_text: str) -> bytes:
    """Inverse of the byte-level view, like llama.cpp `llama_decode_text`.

    A code point outside the 256-entry table cannot come from byte encoding; llama.cpp then writes
    `[UNK_BYTE_0x<hex of its UTF-8>` followed by the whole token text and `]`.
    """
    out = bytearray()
    for ch in token_text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + token_text.encode() + b"]"
    return bytes(out)
