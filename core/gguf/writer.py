"""Write GGUF files atomically (`core/outputs.py`: temp file + rename), on top of gguf-py's
`GGUFWriter`.

Tensors are given as float numpy arrays (stored as F32/F16/BF16 or quantized with gguf-py's reference
quantizers) or as already-quantized raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter
from gguf import quants as gq

from llmkit.core.outputs import atomic_output
from llmkit.errors import LlmkitError


@dataclass
class RawTensor:
    """Already-encoded tensor bytes [*rows, row_bytes] with their type and logical numpy shape."""

    data: np.ndarray
    qtype: QT
    shape: tuple[int, ...]


_ARRAY_TYPES = {
    np.uint8: GGUFValueType.UINT8,
    np.int8: GGUFValueType.INT8,
    np.uint16: GGUFValueType.UINT16,
    np.int16: GGUFValueType.INT16,
    np.uint32: GGUFValueType.UINT32,
    np.int32: GGUFValueType.INT32,
    np.uint64: GGUFValueType.UINT64,
    np.int64: GGUFValueType.INT64,
    np.float32: GGUFValueType.FLOAT32,
    np.float64: GGUFValueType.FLOAT64,
    np.bool_: GGUFValueType.BOOL,
}


def add_kv(w: GGUFWriter, key: str, value: Any) -> None:
    """One metadata value: Python scalars/str/lists, or numpy arrays keeping their element type
    (what `GGUFFile` reads back, so metadata can be copied file to file)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, np.ndarray):
        sub = _ARRAY_TYPES.get(value.dtype.type)
        if sub is None:
            raise LlmkitError(f"cannot write metadata {key} of dtype {value.dtype}")
        w.add_key_value(key, value.tolist(), GGUFValueType.ARRAY, sub_type=sub)
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
    inputs: Iterable = (),
) -> Path:
    """Write `metadata` (general.architecture is set from `arch`) and `tensors` to `path` atomically.
    Float arrays are stored as `default_type` when 2-D (1-D tensors always F32). `inputs`: the files
    this output was made from, which it must never replace."""
    path = Path(path)
    with atomic_output(path, inputs) as tmp:
        w = GGUFWriter(tmp, arch)
        for k, v in metadata.items():
            if k != "general.architecture":
                add_kv(w, k, v)
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
    return path


def write_gguf_streaming(
    path: str | Path,
    arch: str,
    metadata: dict[str, Any],
    infos: list[tuple[str, tuple[int, ...], QT]],
    produce,
    alignment: int | None = None,
    inputs: Iterable = (),
) -> Path:
    """Write a GGUF whose tensors are produced one at a time, so peak memory is one tensor.

    infos: (name, numpy shape, type) in file order; `produce(name)` returns that tensor's encoded
    bytes (any numpy array of the right byte size), called in the same order. The file is written
    to a temp file next to `path` and renamed at the end: on any error, Ctrl-C or SIGTERM nothing is
    left. `metadata` values are typed like `write_gguf`'s (uint32 ints, float32 floats, numpy
    arrays). `inputs`: the files this output is made from, which it must never replace."""
    path = Path(path)
    with atomic_output(path, inputs) as tmp:
        w = GGUFWriter(tmp, arch)
        if alignment is not None and alignment != 32:
            w.data_alignment = alignment
        for k, v in metadata.items():
            if k != "general.architecture":
                add_kv(w, k, v)
        for name, shape, qtype in infos:
            block, type_size = gq.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, _, _ in infos:
            w.write_tensor_data(np.ascontiguousarray(produce(name)).view(np.uint8).reshape(-1))
        w.close()
    return path
