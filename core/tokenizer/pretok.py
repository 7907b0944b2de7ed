"""BPE pre-tokenizers: llama.cpp's `tokenizer.ggml.pre` table and its regex splitting.

Each pre-tokenizer is a list of regexes applied in sequence; every regex splits each current piece
into its matches *and* the unmatched gaps between them. llama.cpp runs a regex that names Unicode
categories (\\p{L}, \\p{N}, ...) with std::regex on a "collapsed" copy of the text (one byte per
code point naming its category) after rewriting each \\p{X} into that byte plus the ASCII members
of X; other regexes run on the code points with non-ASCII whitespace turned into \\v. We replay
both transformations and match with Python's `re` in ASCII mode, which has std::regex's
ECMAScript semantics for every construct used here. (llama.cpp's hand-written GPT-2 and Llama-3
splitters are equivalent to their regexes, so they need no special case.)
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from itertools import accumulate, pairwise

from llmkit.errors import LlmkitError

from .unicode import CATEGORY_ASCII, COLLAPSED, ascii_whitespace, collapse


def _char_class(ranges: str) -> str:
    """Class body from "HEX" / "HEX-HEX" items, so no literal here can be Unicode-normalized."""
    out = []
    for item in ranges.split():
        lo, _, hi = item.partition("-")
        out.append(chr(int(lo, 16)) + (f"-{chr(int(hi, 16))}" if hi else ""))
    return "".join(out)


GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DS3_MAIN = (
    r"[!" + '"' + r"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^" + "\r\n"
    r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[" + "\r\n" + r"]*|\s*[" + "\r\n"
    r"]+|\s+(?!\S)|\s+"
)
DEEPSEEK3 = (r"\p{N}{1,3}", "[" + _char_class("4E00-9FA5 3040-309F 30A0-30FF") + "]+", _DS3_MAIN)
# Cased letters of deepseek-llm's tokenizer.json, code point for code point.
_DS_LETTERS = _char_class(
    "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376 377 37B-37D 37F 386 "
    "388-38A 38C 38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD 1C90-1CBA "
    "1CBD-1CBF 1D00-1D2B 1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D 1F50-1F57 "
    "1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 1FD6-1FDB "
    "1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 2115 2119-211D 2124 2126 2128 212A-212D "
    "212F-2134 2139 213C-213F 2145-2149 214E 2183 2184 2C00-2C7B 2C7E-2CE4 2CEB-2CEE 2CF2 2CF3 "
    "A640-A66D A680-A69B A722-A76F A771-A787 A78B-A78E AB70-ABBF FB00-FB06 FB13-FB17 FF21-FF3A "
    "FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB 10C80-10CB2 10CC0-10CF2 118A0-118DF 1E900-1E943"
)
_CJK_HANGUL = "[" + _char_class("4E00-9FA5 800-4E00 AC00-D7FF") + "]+"
DEEPSEEK_LLM = (
    "[\r\n]",
    r"\s?[" + _DS_LETTERS + "]+",
    r"\s?[" + _char_class("21-2F 3A-7E FF01-FF0F FF1A-FF5E 2018-201F 3000-3002") + "]+",
    r"\s+$",
    _CJK_HANGUL,
    r"\p{N}+",
)
DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
_UPPER_LOWER = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+{c}"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*{c}"
)
TEKKEN = (
    _UPPER_LOWER.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O = (
    _UPPER_LOWER.replace("{c}", _CONTRACTIONS + "?")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?" + _char_class("2026 3002 FF0C 3001 964 6D4 60C") + ")]+"


@dataclass(frozen=True)
class PreTokenizer:
    """What one `tokenizer.ggml.pre` value means to llama.cpp (regexes and vocab flags)."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False  # forced on before the GGUF flags are read (llama3, tekken, chameleon)
    no_bos: bool = False  # chatglm: no BOS id at all
    add_sep: bool = False


def _group(names: str, **spec) -> dict[str, PreTokenizer]:
    value = PreTokenizer(**spec)
    return {name: value for name in names.split()}


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # gemma4 (SPM-style BPE, core/tokenizer/gemma4.py): newline runs only, spaces escaped to U+2581
    **_group("gemma4", regexes=(r"[^\n]+|[\n]+",)),
    **_group(
        "default",
        regexes=(r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    ),
    **_group(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        regexes=(LLAMA3,),
        ignore_merges=True,
        add_bos=True,
    ),
    **_group("dbrx smaug-bpe", regexes=(LLAMA3,)),
    **_group("glm4 chatglm-bpe", regexes=(LLAMA3,), no_bos=True),
    **_group("deepseek-llm", regexes=DEEPSEEK_LLM, clean_spaces=False),
    **_group("deepseek-coder", regexes=DEEPSEEK_CODER, clean_spaces=False),
    **_group("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", regexes=DEEPSEEK3, clean_spaces=False),
    **_group("falcon", regexes=(r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")),
    **_group(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "mpt olmo jais exaone4",
        regexes=(GPT2,),
    ),
    **_group("jina-v1-en jina-v2-code roberta-bpe", regexes=(GPT2,), add_sep=True),
    **_group("trillion granite-docling", regexes=(GPT2,), clean_spaces=False),
    **_group(
        "starcoder refact codeshell exaone minerva-7b mellum2",
        regexes=(r"\p{N}", GPT2),
    ),
    **_group("smollm command-r", regexes=(r"\p{N}", GPT2), clean_spaces=False),
    **_group(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2",
        regexes=(QWEN2,),
        clean_spaces=False,
    ),
    **_group("laguna", regexes=("[^\\n]+|[\\n]+", QWEN2), clean_spaces=False),
    **_group("ufakzeka", regexes=(QWEN2[len(_CONTRACTIONS) + 1 :],), clean_spaces=False),
    **_group(
        "bailingmoe bailingmoe2 llada-moe",
        regexes=(
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        ),
        clean_spaces=False,
    ),
    **_group(
        "seed-coder",
        regexes=(
            _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        clean_spaces=False,
    ),
    **_group(
        "minicpm5",
        regexes=(r"\p{N}{1,3}", QWEN2.replace(r"|\p{N}|", r"|\p{N}+|")),
        ignore_merges=True,
    ),
    **_group("stablelm2 megrez", regexes=(QWEN2,)),
    **_group("qwen35", regexes=(QWEN35,), clean_spaces=False),
    **_group("poro-chat", regexes=(_PORO,), clean_spaces=False),
    **_group("bloom gpt3-finnish", regexes=(_PORO,)),
    **_group("viking", regexes=(_PORO, r"\p{N}"), clean_spaces=False),
    **_group("tekken", regexes=(TEKKEN,), clean_spaces=False, ignore_merges=True, add_bos=True),
    **_group("gpt-4o llama4 kanana2 talkie minimax-m2", regexes=(GPT4O,), clean_spaces=False),
    **_group(
        "chameleon",
        regexes=(
            "<sentinel:[0-9]+>",
            "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            "([\\t\\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            GPT2,
        ),
        add_bos=True,
        clean_spaces=False,
    ),
}


def pre_tokenizer(name: str) -> PreTokenizer:
    """The pre-tokenizer for a `tokenizer.ggml.pre` value (empty means llama.cpp's 'default')."""
    spec = PRE_TOKENIZERS.get(name or "default")
    if spec is None:
        raise LlmkitError(f"unsupported BPE pre-tokenizer type {name!r}")
    return spec


_CATEGORIES = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S"}
_CATEGORIES.update({f"L{c}": "L" for c in "ultmo"})  # llama.cpp folds \p{Lu} etc. into \p{L}


def uses_categories(regex: str) -> bool:
    return any(f"\\p{{{name}}}" in regex for name in _CATEGORIES)


def collapse_regex(regex: str) -> str:
    """llama.cpp's rewrite of a category regex for the collapsed text (same bracket tracking)."""
    out: list[str] = []
    inside = False
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "[" and (i == 0 or regex[i - 1] != "\\"):
            out.append("[")
            inside = True
        elif inside and ch == "]" and regex[i - 1] != "\\":
            out.append("]")
            inside = False
        elif regex.startswith("\\p{", i) and (close := regex.find("}", i + 3)) != -1:
            name = _CATEGORIES.get(regex[i + 3 : close]) if close <= i + 10 else None
            if name is None:
                out.append(ch)
            else:
                body = COLLAPSED[name] + CATEGORY_ASCII[name]
                out.append(body if inside else f"[{body}]")
                i = close
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _python_pattern(regex: str) -> re.Pattern:
    """Compile for `re.split`: one capture group around the whole regex, none inside."""
    # ECMAScript `$` (no multiline) is the end of input; Python's `$` also matches before a final \n.
    regex = re.sub(r"(?<!\\)\$$", r"\\Z", regex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "possible set operation" hints
        return re.compile(f"({_uncapture(regex)})", re.ASCII)


def _uncapture(regex: str) -> str:
    """Turn capturing groups into non-capturing ones (escapes and classes respected)."""
    out = []
    escaped = in_class = False
    for i, ch in enumerate(regex):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(" and not regex.startswith("?", i + 1):
            out.append("(?:")
            continue
        out.append(ch)
    return "".join(out)


class RegexSplitter:
    """Splits text into pre-tokens exactly like llama.cpp `unicode_regex_split` (before byte
    encoding)."""

    def __init__(self, regexes: tuple[str, ...]):
        self.steps: list[tuple[re.Pattern, bool]] = []
        for regex in regexes:
            collapsed = uses_categories(regex)
            if collapsed and any(ord(c) >= 128 for c in regex):
                raise LlmkitError("pre-tokenizer regex mixes categories and non-ASCII characters")
            pattern = _python_pattern(collapse_regex(regex) if collapsed else regex)
            self.steps.append((pattern, collapsed))

    def split(self, text: str) -> list[str]:
        subjects: dict[bool, str] = {}
        bounds = [0, len(text)]  # piece i is text[bounds[i]:bounds[i + 1]]
        for pattern, collapsed in self.steps:
            if collapsed not in subjects:
                subjects[collapsed] = collapse(text) if collapsed else ascii_whitespace(text)
            subject = subjects[collapsed]
            new = [0]
            for start, end in pairwise(bounds):
                # split() alternates gaps and matches; their lengths give the new boundaries
                parts = pattern.split(subject if len(bounds) == 2 else subject[start:end])
                new.extend(accumulate(map(len, parts), initial=start))
            bounds = list(dict.fromkeys(new))  # drop the empty pieces (repeated offsets)
        return [text[a:b] for a, b in pairwise(bounds)]
