"""Request-body validation shared by both APIs: typed getters that raise ApiError (a 400 in the
API's own error shape) with one clear line, and the sampling parameters both APIs accept."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.core.decode.sampling import SamplerParams
from llmkit.errors import LlmkitError


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # the largest max_tokens a request may ask for
    max_stop: int = 16  # stop sequences per request


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
        v, ok = float(v), True
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
    return v


def sampler(body: dict) -> SamplerParams:
    """temperature/top_p/seed (both APIs) plus llama.cpp's top_k/min_p/repeat_penalty; defaults
    are llama.cpp's sampler defaults."""
    temp = get(body, "temperature", float, 0.8)
    if not 0.0 <= temp <= 2.0:
        raise ApiError(400, "'temperature' must be between 0 and 2")
    p = SamplerParams(
        temp=temp,
        top_k=get(body, "top_k", int, 40),
        top_p=get(body, "top_p", float, 0.95),
        min_p=get(body, "min_p", float, 0.05),
        repeat_penalty=get(body, "repeat_penalty", float, 1.0),
        seed=get(body, "seed", int, -1),
    )
    try:
        p.validate()
    except LlmkitError as e:
        raise ApiError(400, str(e).replace("--", "").replace("-", "_")) from None
    return p


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
