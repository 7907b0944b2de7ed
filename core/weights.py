"""Model weights as they are stored in the GGUF file, plus the name/shape contract per architecture.

A `QTensor` is a zero-copy view of a tensor's bytes in the memory-mapped file (quantized blocks stay
quantized). Architectures declare the tensors they expect as data (`TensorSpec`s); `load_tensors`
checks them against the file and fails with one line naming the first missing, unexpected or
wrongly-shaped tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.errors import LlmkitError
from llmkit.core.gguf_file import GGUFFile
from llmkit.quant.dequant import SUPPORTED_TYPES, dequantize


@dataclass
class QTensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # numpy order, e.g. (out_features, in_features)
    raw: torch.Tensor  # uint8 [*shape[:-1], row_bytes], a view of the mmapped file

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape, dtype=dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize only the selected rows (embedding lookup): [len(idx), shape[-1]]."""
        return dequantize(self.raw[idx], self.qtype, dtype=dtype)


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
        out[s.name] = QTensor(s.name, qtype, tuple(info.shape), gf.torch_raw(s.name))
    return out


def weights_by_type(tensors: dict[str, QTensor]) -> dict[str, dict[str, int]]:
    """{type name: {"tensors": n, "bytes": b}} for the memory plan."""
    count, size = Counter(), Counter()
    for t in tensors.values():
        count[t.qtype.name] += 1
        size[t.qtype.name] += t.nbytes
    return {k: {"tensors": count[k], "bytes": size[k]} for k in sorted(count)}
