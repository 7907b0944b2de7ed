"""Typed architecture configs read from GGUF metadata, validated before any use.

Each architecture declares a `@dataclass(kw_only=True)` subclass of `ModelConfig` whose fields name
their GGUF key in `field(metadata=...)`:
`gguf("attention.head_count")` reads `{arch}.attention.head_count`; a key starting with "@" is absolute.
Fields without a default are required: a missing key is a one-line error naming it.

Every value read is checked against the field's annotation (int, float, bool, str, or a per-layer
list of those) and its declared range (`at_least`, `at_most`, `above`) before the config exists: a
string where a number belongs, a float block count, a zero head count, a NaN epsilon or a
2^31-layer model is an error that names the key, what it must be and what the file holds, never
an exception deep in the model code or an allocation sized by a lie.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llmkit.core.cache.layout import LayerKV
from llmkit.errors import LlmkitError

T = TypeVar("T")
_MISSING = dataclasses.MISSING
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
MAX_DIM = 1 << 20  # widths, head counts and FFN sizes beyond this are lies, not models
MAX_HEAD_DIM = 4096


def gguf(key: str, default: Any = _MISSING, *, at_least=None, at_most=None, above=None, **kw):
    """A config field read from `{arch}.{key}` (or from `key[1:]` when key starts with '@'),
    with an optional range: at_least <= v <= at_most, v > above (per element for lists)."""
    meta = {"gguf": key, "at_least": at_least, "at_most": at_most, "above": above}
    return dataclasses.field(default=default, metadata=meta, **kw)


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return f"bool {v}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"float {v}"
    if isinstance(v, str):
        return f"string {v[:40]!r}"
    if isinstance(v, (list, np.ndarray)):
        kind = v.dtype.name if isinstance(v, np.ndarray) else "mixed"
        return f"array of {len(v)} {kind}"
    return type(v).__name__


def _scalar_ok(kind: type, v: Any) -> bool:
    if kind is bool:
        return isinstance(v, (bool, np.bool_))
    if kind is int:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    if kind is float:  # an integer is a fine float; a bool is not
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
            v, (bool, np.bool_)
        )
    return isinstance(v, kind)


def _kinds(annotation: Any) -> tuple[set, set]:
    """(scalar types, list element types) an annotation admits (None is never read from a file)."""
    scalars, lists = set(), set()
    for a in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(a) is list:
            lists.update(typing.get_args(a))
        elif a in (int, float, bool, str):
            scalars.add(a)
    return scalars, lists


def _check_value(full: str, annotation: Any, meta: dict, v: Any) -> Any:
    """The value converted to the field's type, or a one-line error naming the key."""
    scalars, lists = _kinds(annotation)
    want = " or ".join([t.__name__ for t in scalars] + [f"array of {t.__name__}" for t in lists])
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list):
        kind = next((k for k in lists if all(_scalar_ok(k, x) for x in v)), None)
        if kind is None or not v:
            raise LlmkitError(f"GGUF metadata {full} must be {want}, found {_describe(v)}")
        items = [kind(x) for x in v]
    else:
        kind = next((k for k in (int, bool, str, float) if k in scalars and _scalar_ok(k, v)), None)
        if kind is None:
            raise LlmkitError(f"GGUF metadata {full} must be {want}, found {_describe(v)}")
        items = [kind(v)]
    for x in items:
        if isinstance(x, float) and not math.isfinite(x):
            raise LlmkitError(f"GGUF metadata {full} must be finite, found {x}")
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            lo, hi, gt = meta.get("at_least"), meta.get("at_most"), meta.get("above")
            if (
                (lo is not None and x < lo)
                or (hi is not None and x > hi)
                or (gt is not None and x <= gt)
            ):
                rng = " and ".join(
                    s
                    for s in (
                        f">= {lo}" if lo is not None else "",
                        f"> {gt}" if gt is not None else "",
                        f"<= {hi}" if hi is not None else "",
                    )
                    if s
                )
                raise LlmkitError(f"GGUF metadata {full} must be {rng}, found {x}")
    return items if isinstance(v, list) else items[0]


@dataclass(kw_only=True)
class ModelConfig:
    """What every architecture's config has. `n_layer` counts the trunk's layers only; the GGUF's
    block_count (`n_layer_all`) also counts the trailing NextN (MTP) blocks, il = n_layer ..
    n_layer_all - 1. Per-layer metadata arrays have n_layer_all entries."""

    n_vocab: int  # rows of token_embd (set by the loader)
    n_embd: int = gguf("embedding_length", at_least=1, at_most=MAX_DIM)
    n_layer_all: int = gguf("block_count", at_least=1, at_most=MAX_LAYERS)
    n_nextn: int = gguf("nextn_predict_layers", 0, at_least=0, at_most=MAX_LAYERS)
    eps: float = gguf("attention.layer_norm_rms_epsilon", 1e-5, above=0.0, at_most=1.0)
    n_ctx_train: int = gguf("context_length", 4096, at_least=1, at_most=1 << 30)
    softcap: float = 0.0  # final logit soft-cap (0: none); Gemma reads it from the file
    n_layer: int = dataclasses.field(init=False)

    def __post_init__(self):
        if not 0 <= self.n_nextn < self.n_layer_all:
            raise LlmkitError(
                f"nextn_predict_layers {self.n_nextn} must be below block_count {self.n_layer_all}"
            )
        self.n_layer = self.n_layer_all - self.n_nextn

    def layer_kv(self, il: int) -> LayerKV:
        """The cache geometry of layer il (trunk or NextN block)."""
        raise NotImplementedError(f"{type(self).__module__} declares no layer_kv")


def read_config(cls: type[T], md: dict[str, Any], arch: str, **overrides) -> T:
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f.metadata.get("gguf")
        if key is None or f.name in overrides:
            continue
        full = key[1:] if key.startswith("@") else f"{arch}.{key}"
        if full in md:
            values[f.name] = _check_value(full, hints[f.name], f.metadata, md[full])
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise LlmkitError(f"missing GGUF metadata key {full} (required by {arch})")
    values.update(overrides)
    try:
        return cls(**values)
    except TypeError as e:  # a required non-GGUF field left unset
        raise LlmkitError(f"bad {arch} config: {e}") from None


class MoEConfig:
    """The routed-experts part of an architecture's config (fields n_expert, n_expert_used,
    n_expert_used_override): `top_k` is the experts used per token."""

    def top_k(self) -> int:
        """Experts used per token: --moe-n-expert when given, else expert_used_count."""
        k = self.n_expert_used_override
        if k is None:
            return self.n_expert_used
        if not 1 <= k <= self.n_expert:
            raise LlmkitError(f"--moe-n-expert {k} must be between 1 and {self.n_expert}")
        return k


def per_layer(value: Any, n_layer: int, name: str) -> list:
    """Expand a scalar-or-array hparam to one value per layer (arrays must match n_layer)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise LlmkitError(
                f"{name} has {len(value)} entries, expected {n_layer} (one per layer)"
            )
        return list(value)
    return [value] * n_layer
