"""GGUF metadata as plain Python values.

`gguf.GGUFReader` keeps every key/value as raw numpy parts; this turns them into str / int / float /
bool / list / numpy arrays once, so configs and tokenizers read a simple mapping. Large numeric arrays
(token scores, token types) stay numpy arrays; string arrays become lists of str.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType


def _field_value(field) -> Any:
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            parts = field.parts
            return [bytes(parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(types) > 1 and types[1] == GGUFValueType.ARRAY:
            return field.contents()  # nested arrays: rare, let gguf decode them
        if not field.data:
            return np.zeros(0)
        # contiguous scalar parts: one part per element
        return np.concatenate([field.parts[i] for i in field.data])
    value = field.parts[field.data[0]][0]
    if types[0] == GGUFValueType.BOOL:
        return bool(value)
    if types[0] in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return float(value)
    return int(value)


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value pairs of a GGUF file (the GGUF.* header pseudo-keys excluded)."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
