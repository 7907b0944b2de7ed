"""Typed architecture configs read from GGUF metadata.

Each architecture declares a `@dataclass` whose fields name their GGUF key in `field(metadata=...)`:
`gguf("attention.head_count")` reads `{arch}.attention.head_count`; a key starting with "@" is absolute.
Fields without a default are required: a missing key is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import numpy as np

from llmkit.errors import LlmkitError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def gguf(key: str, default: Any = _MISSING, **kw):
    """A config field read from `{arch}.{key}` (or from `key[1:]` when key starts with '@')."""
    return dataclasses.field(default=default, metadata={"gguf": key}, **kw)


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
