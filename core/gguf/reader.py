"""A bounds-checked GGUF reader over a copy-on-write memory map.

Why not only `gguf.GGUFReader`: it builds one numpy part per array element, which takes ~18 s on
Gemma 3's 262144-token vocabulary. This reader parses the header in one pass (string arrays decoded
in a tight loop, numeric arrays as single numpy views) and checks every length against the file size,
so a truncated or hostile file fails with one line instead of a traceback or a huge allocation.
`tests/test_gguf_file.py` checks that it agrees with `GGUFReader` on the real models.

Layout (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 kv count;
kv pairs (string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 ne[n_dims] with the
fastest dimension first, u32 ggml type, u64 offset relative to the data section); padding to
`general.alignment` (default 32); tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmkit.errors import LlmkitError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value types -> (struct format, numpy dtype); 8 = string, 9 = array
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int  # raw ggml type number (may be unknown to us)
    shape: tuple[int, ...]  # numpy order: rows first (ggml ne reversed)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def qtype(self) -> GGMLQuantizationType:
        try:
            return GGMLQuantizationType(self.type_id)
        except ValueError:
            raise LlmkitError(f"tensor {self.name} has unknown ggml type {self.type_id}") from None

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type#{self.type_id}"


class _Cursor:
    """Sequential reads with a bounds check on each one."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise LlmkitError(f"{self.path}: truncated or corrupt GGUF while reading {what}")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], what)
            return float(v) if vtype in (6, 12) else (bool(v) if vtype == 7 else int(v))
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        raise LlmkitError(f"{self.path}: unknown GGUF value type {vtype} in {what}")

    def array(self, what: str) -> Any:
        itype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if itype in _SCALARS:
            dt = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
            self.need(count * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
            self.pos += count * dt.itemsize
            return arr.astype(np.bool_) if itype == 7 else arr
        if itype == _STRING:
            self.need(count * 8, what)  # every string carries at least its u64 length
            buf, pos, out = self.buf, self.pos, []
            end = len(buf)
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                if pos + 8 > end:
                    raise LlmkitError(
                        f"{self.path}: truncated or corrupt GGUF while reading {what}"
                    )
                (n,) = unpack(buf, pos)
                pos += 8
                if pos + n > end:
                    raise LlmkitError(
                        f"{self.path}: truncated or corrupt GGUF while reading {what}"
                    )
                out.append(str(buf[pos : pos + n], "utf-8", "replace"))
                pos += n
            self.pos = pos
            return out
        if itype == _ARRAY:
            self.need(count * 12, what)
            return [self.array(what) for _ in range(count)]
        raise LlmkitError(f"{self.path}: unknown GGUF array item type {itype} in {what}")


class GGUFFile:
    """An opened GGUF file: `metadata` (dict), `tensors` (name -> TensorInfo), zero-copy tensor bytes."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise LlmkitError(f"model file not found: {path}")
        if p.stat().st_size < 24:
            raise LlmkitError(f"{path}: not a GGUF file (too short)")
        # copy-on-write: writable numpy views (torch.from_numpy needs that) without touching the file
        self._mm = np.memmap(p, dtype=np.uint8, mode="c")
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(cur.buf[:4]) != GGUF_MAGIC:
            raise LlmkitError(f"{path}: not a GGUF file (bad magic {bytes(cur.buf[:4])!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):  # llama.cpp reads versions 2 and 3 (same layout)
            raise LlmkitError(f"{path}: unsupported GGUF version {self.version} (need 2 or 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "kv count")
        # each kv needs >= 12 bytes, each tensor info >= 24: reject absurd counts before looping
        cur.need(n_kv * 12 + n_tensors * 24, "header counts")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}  # key -> GGUF value type (what the writer declared)
        for i in range(n_kv):
            key = cur.string(f"key #{i}")
            if key in self.metadata:
                raise LlmkitError(f"{path}: duplicate metadata key {key}")
            vtype = cur.scalar("<I", f"type of {key}")
            self.metadata[key] = cur.value(vtype, key)
            self.value_types[key] = vtype
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<I", f"dims of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise LlmkitError(f"{path}: tensor {name} has {n_dims} dimensions")
            ne = [cur.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
            type_id = cur.scalar("<I", f"type of {name}")
            rel = cur.scalar("<Q", f"offset of {name}")
            infos.append((name, ne, type_id, rel))
        align = self.metadata.get("general.alignment", 32)
        if "general.alignment" in self.metadata and self.value_types["general.alignment"] != 4:
            raise LlmkitError(f"{path}: general.alignment must be a u32, found {align!r}")
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise LlmkitError(f"{path}: general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_offset = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        size, expected = len(self._mm), 0
        for name, ne, type_id, rel in infos:
            if name in self.tensors:
                raise LlmkitError(f"{path}: duplicate tensor {name}")
            if any(d <= 0 or d > 1 << 40 for d in ne):
                raise LlmkitError(f"{path}: tensor {name} has invalid shape {ne}")
            n = int(np.prod(ne, dtype=object))
            nbytes = _nbytes(name, type_id, ne[0], n)
            # llama.cpp's layout rule: tensors lie in header order, each at the running end of
            # the previous ones padded to the alignment. A type or shape changed without moving
            # the data, an overlap or a gap breaks it, so such files fail here, as they do there.
            if rel != expected:
                raise LlmkitError(
                    f"{path}: tensor {name} has data offset {rel}, expected {expected} "
                    f"(overlapping, misaligned or mis-sized tensor data)"
                )
            expected += (nbytes + align - 1) // align * align
            start = self.data_offset + rel
            if start + nbytes > size:
                raise LlmkitError(
                    f"{path}: truncated file: tensor {name} needs bytes up to {start + nbytes}, "
                    f"file has {size}"
                )
            self.tensors[name] = TensorInfo(name, type_id, tuple(reversed(ne)), start, nbytes)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise LlmkitError(f"{self.path}: no general.architecture in metadata")
        return arch

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view shaped [*rows, row_bytes] (no copy)."""
        t = self.tensors[name]
        rows = t.shape[:-1]
        row_bytes = t.nbytes // max(1, int(np.prod(rows, dtype=np.int64)))
        return self._mm[t.offset : t.offset + t.nbytes].reshape(*rows, row_bytes)


def _nbytes(name: str, type_id: int, row: int, n: int) -> int:
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise LlmkitError(f"tensor {name} has unknown ggml type {type_id}") from None
    if row % block:
        raise LlmkitError(
            f"tensor {name}: row of {row} elements is not a multiple of the {qtype.name} "
            f"block size {block}"
        )
    return n // block * type_size
