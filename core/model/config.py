"""Typed architecture configs read from GGUF metadata.

Each architecture declares a `@dataclass(kw_only=True)` subclass of `ModelConfig` whose fields name
their GGUF key in `field(metadata=...)`:
`gguf("attention.head_count")` reads `{arch}.attention.head_count`; a key starting with "@" is absolute.
Fields without a default are required: a missing key is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llmkit.core.cache.layout import LayerKV
from llmkit.errors import LlmkitError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def gguf(key: str, default: Any = _MISSING, **kw):
    """A config field read from `{arch}.{key}` (or from `key[1:]` when key starts with '@')."""
    return dataclasses.field(default=default, metadata={"gguf": key}, **kw)


@dataclass(kw_only=True)
class ModelConfig:
    """What every architecture's config has. `n_layer` counts the trunk's layers only; the GGUF's
    block_count (`n_layer_all`) also counts the trailing NextN (MTP) blocks, il = n_layer ..
    n_layer_all - 1. Per-layer metadata arrays have n_layer_all entries."""

    n_vocab: int  # rows of token_embd (set by the loader)
    n_embd: int = gguf("embedding_length")
    n_layer_all: int = gguf("block_count")
    n_nextn: int = gguf("nextn_predict_layers", 0)
    eps: float = gguf("attention.layer_norm_rms_epsilon", 1e-5)
    n_ctx_train: int = gguf("context_length", 4096)
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
    for f in dataclasses.fields(cls):
        key = f.metadata.get("gguf")
        if key is None or f.name in overrides:
            continue
        full = key[1:] if key.startswith("@") else f"{arch}.{key}"
        if full in md:
            v = md[full]
            values[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise LlmkitError(f"missing GGUF metadata key {full} (required by {arch})")
    values.update(overrides)
    try:
        return cls(**values)
    except TypeError as e:  # a required non-GGUF field left unset
        raise LlmkitError(f"bad {arch} config: {e}") from None


def per_layer(value: Any, n_layer: int, name: str) -> list:
    """Expand a scalar-or-array hparam to one value per layer (arrays must match n_layer)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise LlmkitError(
                f"{name} has {len(value)} entries, expected {n_layer} (one per layer)"
            )
        return list(value)
    return [value] * n_layer
