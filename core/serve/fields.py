"""Request-body validation shared by both APIs: typed getters that raise ApiError (a 400 in the
API's own error shape) with one clear line, and the sampling parameters both APIs accept."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmkit.core.decode.sampling import SamplerParams
from llmkit.errors import LlmkitError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # the largest max_tokens a request may ask for
    max_stop: int = 16  # stop sequences per request
    max_stop_len: int = 256  # characters per stop sequence


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_NAMES.update({list: "an array", dict: "an object"})


def get(body: dict, key: str, kind: type, default=None, required: bool = False):
    if key not in body or body[key] is None:
        if required:
            raise ApiError(400, f"'{key}' is required")
        return default
    v = body[key]
    ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        try:
            v, ok = float(v), True
        except OverflowError:  # an integer beyond any float
            raise ApiError(400, f"'{key}' is out of range") from None
    if not ok:
        raise ApiError(400, f"'{key}' must be {_NAMES[kind]}")
    return v


def max_tokens(body: dict, keys: tuple[str, ...], limits: Limits, required: bool = False) -> int:
    for key in keys:
        n = get(body, key, int)
        if n is not None:
            if not 1 <= n <= limits.max_tokens:
                raise ApiError(400, f"'{key}' must be between 1 and {limits.max_tokens}")
            return n
    if required:
        raise ApiError(400, f"'{keys[0]}' is required")
    return limits.max_tokens


def stop_list(body: dict, key: str, limits: Limits) -> list[str]:
    v = body.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, f"'{key}' must be a string or an array of strings")
    if len(v) > limits.max_stop:
        raise ApiError(400, f"'{key}' may hold at most {limits.max_stop} sequences")
    if any(not s or len(s) > limits.max_stop_len for s in v):
        raise ApiError(400, f"'{key}': each sequence must be 1 to {limits.max_stop_len} characters")
    return v


API_NAMES = {
    "temp": "'temperature'",
    "top_k": "'top_k'",
    "top_p": "'top_p'",
    "min_p": "'min_p'",
    "repeat_penalty": "'repeat_penalty'",
    "repeat_last_n": "'repeat_last_n'",
    "seed": "'seed'",
    "presence_penalty": "'presence_penalty'",
    "frequency_penalty": "'frequency_penalty'",
    "logit_bias": "'logit_bias'",
}


def number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (JSON may carry NaN and Infinity: Python's parser takes them)."""
    v = get(body, key, float, default)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ApiError(400, f"'{key}' must be a number between {lo:g} and {hi:g}, got {v!r}")
    return v


def logit_bias(body: dict, n_vocab: int | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias}: ids as decimal strings, biases in [-100, 100]."""
    v = get(body, "logit_bias", dict)
    if not v:
        return None
    out = {}
    for k, b in v.items():
        if not k.isdecimal() or (n_vocab is not None and int(k) >= n_vocab):
            top = f" between 0 and {n_vocab - 1}" if n_vocab else ""
            raise ApiError(400, f"'logit_bias' keys must be token ids{top}, got {k!r}")
        ok = isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
        if not ok or not -100 <= b <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers in [-100, 100], got {b!r}")
        out[int(k)] = float(b)
    return out


def sampler(body: dict, n_vocab: int | None = None) -> SamplerParams:
    """temperature/top_p/seed (both APIs), OpenAI's presence/frequency penalties and logit_bias,
    plus llama.cpp's top_k/min_p/repeat_penalty; defaults are llama.cpp's sampler defaults."""
    p = SamplerParams(
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=logit_bias(body, n_vocab),
        temp=number(body, "temperature", 0.8, 0.0, 2.0),
        top_k=get(body, "top_k", int, 40),
        top_p=number(body, "top_p", 0.95, 0.0, 1.0),
        min_p=number(body, "min_p", 0.05, 0.0, 1.0),
        repeat_penalty=get(body, "repeat_penalty", float, 1.0),
        repeat_last_n=get(body, "repeat_last_n", int, 64),
        seed=get(body, "seed", int, -1),
    )
    try:
        p.validate(API_NAMES)
    except LlmkitError as e:
        raise ApiError(400, str(e)) from None
    return p


def json_depth(raw: bytes, limit: int) -> str:
    """Checked before parsing (json.loads recurses: a deep enough body ends in RecursionError):
    "ok", "deep" (arrays/objects nest deeper than `limit`) or "bad" (unbalanced brackets).
    Strings are blanked first, then innermost bracket pairs are peeled one level per round, all in
    C (re.sub), so a 1 MiB body costs milliseconds."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return "ok"
    b = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        peeled = _PAIR.sub(b"", b)  # one pass: exactly one level
        if peeled == b:
            break
        b = peeled
    if not b:
        return "ok"
    return "bad" if _PAIR.sub(b"", b) == b else "deep"


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def text_content(content, where: str) -> str:
    """A message's content: a string, or an array of text blocks (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "text":
                raise ApiError(400, f"{where}: only text content blocks are supported")
            if not isinstance(block.get("text"), str):
                raise ApiError(400, f"{where}: a text block needs a string 'text'")
            parts.append(block["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or an array of text blocks")
