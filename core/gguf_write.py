"""Write GGUF files atomically (temp file + rename), on top of gguf-py's `GGUFWriter`.

Tensors are given as float numpy arrays (stored as F32/F16/BF16 or quantized with gguf-py's reference
quantizers) or as already-quantized raw bytes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter
from gguf import quants as gq

from llmkit.core.errors import LlmkitError


@dataclass
class RawTensor:
    """Already-encoded tensor bytes [*rows, row_bytes] with their type and logical numpy shape."""

    data: np.ndarray
    qtype: QT
    shape: tuple[int, ...]


def _add_kv(w: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, np.ndarray):
        vt = {
            np.float32: GGUFValueType.FLOAT32,
            np.int32: GGUFValueType.INT32,
            np.bool_: GGUFValueType.BOOL,
            np.uint32: GGUFValueType.UINT32,
        }[value.dtype.type]
        w.add_array(key, value.tolist()) if vt != GGUFValueType.FLOAT32 else w.add_key_value(
            key, value.tolist(), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32
        )
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise LlmkitError(f"cannot write metadata {key} of type {type(value).__name__}")


def encode_tensor(arr: np.ndarray, qtype: QT) -> RawTensor:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == QT.F32:
        return RawTensor(arr, qtype, arr.shape)
    if qtype == QT.F16:
        return RawTensor(arr.astype(np.float16), qtype, arr.shape)
    return RawTensor(gq.quantize(arr, qtype), qtype, arr.shape)


def write_gguf(
    path: str | Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: dict[str, np.ndarray | RawTensor],
    default_type: QT = QT.F32,
) -> Path:
    """Write `metadata` (general.architecture is set from `arch`) and `tensors` to `path` atomically.
    Float arrays are stored as `default_type` when 2-D (1-D tensors always F32)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        w = GGUFWriter(tmp, arch)
        for k, v in metadata.items():
            if k != "general.architecture":
                _add_kv(w, k, v)
        for name, t in tensors.items():
            if not isinstance(t, RawTensor):
                t = encode_tensor(t, default_type if t.ndim >= 2 else QT.F32)
            if t.qtype in (QT.F32, QT.F16):
                w.add_tensor(name, t.data)
            else:
                w.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
