"""A GGUF tensor as stored: the weight type every kernel and model reads.

A `QTensor` is a zero-copy view of a tensor's bytes (quantized blocks stay quantized), usually a
view of the memory-mapped GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.quant.dequant import dequantize


@dataclass
class QTensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # numpy order, e.g. (out_features, in_features)
    raw: torch.Tensor  # uint8 [*shape[:-1], row_bytes], a view of the mmapped file
    mapped: bool = False  # raw views a read-only file mapping (its pages read back if dropped)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape, dtype=dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize only the selected rows (embedding lookup): [len(idx), shape[-1]]."""
        return dequantize(self.raw[idx], self.qtype, dtype=dtype)
