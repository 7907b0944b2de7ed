"""Importance-matrix files for `llm quantize --imatrix`, as llama-quantize reads them.

GGUF format (llama-imatrix >= b5900): for each weight `<name>`, an F32 tensor `<name>.in_sum2`
[n_mat, ne0] (sums of squared activations per input column, one row per expert) and `<name>.counts`
[n_mat] (number of activations summed). The weight of column j of matrix m is in_sum2 / counts,
or 1 where a matrix never saw input (counts == 0).

Legacy .dat: i32 n_entries, then per entry: i32 name_len, name bytes, i32 ncall, i32 nval,
f32[nval]: per-column mean squared activations multiplied by ncall, so the weight is value / ncall
(when ncall > 0), exactly as llama-quantize divides on load.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from llmkit.errors import LlmkitError


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """-> {tensor name: f32 weights [n_mat * ne0]}."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"imatrix file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_dat(path)


def _load_gguf(path: Path) -> dict[str, np.ndarray]:
    from llmkit.core.gguf.reader import GGUFFile

    gf = GGUFFile(path)
    out = {}
    for name, t in gf.tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        ct = gf.tensors.get(base + ".counts")
        if ct is None or t.type_name != "F32" or ct.type_name != "F32":
            raise LlmkitError(f"{path}: {base} lacks an F32 .counts tensor")
        sums = gf.raw(name).view(np.float32).reshape(-1, t.shape[-1])  # [n_mat, ne0]
        counts = gf.raw(base + ".counts").view(np.float32).reshape(-1)
        if counts.size != sums.shape[0]:
            raise LlmkitError(f"{path}: {base}: {counts.size} counts for {sums.shape[0]} matrices")
        e = np.ones_like(sums)
        seen = counts > 0
        e[seen] = sums[seen] / counts[seen, None]
        out[base] = _check(path, base, e.reshape(-1))
    if not out:
        raise LlmkitError(f"{path}: no imatrix entries (<name>.in_sum2 tensors)")
    return out


def _load_dat(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise LlmkitError(f"{path}: truncated imatrix file")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v

    (n,) = take("<i")
    if n <= 0:
        raise LlmkitError(f"{path}: not an imatrix file (no entries)")
    out = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln <= 0 or pos + ln > len(data):
            raise LlmkitError(f"{path}: corrupt imatrix entry name")
        name = data[pos : pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval <= 0 or pos + 4 * nval > len(data):
            raise LlmkitError(f"{path}: corrupt imatrix entry {name}")
        e = np.frombuffer(data, np.float32, nval, pos).copy()
        pos += 4 * nval
        if ncall > 0:
            e /= ncall
        out[name] = _check(path, name, e)
    return out


def _check(path: Path, name: str, e: np.ndarray) -> np.ndarray:
    if not np.isfinite(e).all():
        raise LlmkitError(f"{path}: imatrix entry {name} has non-finite values")
    return e.astype(np.float32)
