"""The name/shape contract of an architecture's weights, checked against a GGUF file.

Architectures declare the tensors they expect as data (`TensorSpec`s); `load_tensors`
checks them against the file and fails with one line naming the first missing, unexpected or
wrongly-shaped tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from llmkit.core.gguf.reader import GGUFFile
from llmkit.errors import LlmkitError
from llmkit.quant.dequant import SUPPORTED_TYPES
from llmkit.quant.tensor import QTensor


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    optional: bool = False


def load_tensors(gf: GGUFFile, specs: list[TensorSpec], ignore_prefixes: tuple[str, ...] = ()):
    """Map every spec'd tensor to a QTensor; error on missing/unexpected/mis-shaped/unsupported ones.

    Tensors whose names start with one of `ignore_prefixes` are left unread (e.g. NextN blocks when
    MTP is off): they are neither loaded nor reported as unexpected.
    """
    by_name = {s.name: s for s in specs}
    for name in gf.tensors:
        if name not in by_name and not name.startswith(ignore_prefixes):
            raise LlmkitError(f"{gf.path}: unexpected tensor {name} for {gf.architecture}")
    out: dict[str, QTensor] = {}
    for s in specs:
        info = gf.tensors.get(s.name)
        if info is None:
            if s.optional:
                continue
            raise LlmkitError(f"{gf.path}: missing tensor {s.name}")
        if tuple(info.shape) != tuple(s.shape):
            raise LlmkitError(
                f"{gf.path}: tensor {s.name} has shape {list(info.shape)}, expected {list(s.shape)}"
            )
        qtype = info.qtype
        if qtype not in SUPPORTED_TYPES:
            raise LlmkitError(f"{gf.path}: tensor {s.name} has unsupported type {qtype.name}")
        out[s.name] = QTensor(
            s.name, qtype, tuple(info.shape), torch.from_numpy(gf.raw(s.name)), mapped=True
        )
    return out


def weights_by_type(tensors: dict[str, QTensor]) -> dict[str, dict[str, int]]:
    """{type name: {"tensors": n, "bytes": b}} for the memory plan."""
    count, size = Counter(), Counter()
    for t in tensors.values():
        count[t.qtype.name] += 1
        size[t.qtype.name] += t.nbytes
    return {k: {"tensors": count[k], "bytes": size[k]} for k in sorted(count)}


def ignore_prefixes(c, part: str) -> tuple[str, ...]:
    """`blk.N.` prefixes outside `part` ("trunk" or "mtp"), for load_tensors(ignore_prefixes=...)."""
    if part not in ("trunk", "mtp"):
        raise ValueError(f"part must be trunk or mtp, not {part!r}")
    mine = range(c.n_layer) if part == "trunk" else range(c.n_layer, c.n_layer_all)
    return tuple(f"blk.{il}." for il in range(c.n_layer_all) if il not in mine)
