"""The name/shape contract of an architecture's weights, checked against a GGUF file.

Architectures declare the tensors they expect as data (`TensorSpec`s, core/model/specs.py);
`load_tensors` checks them against the file and fails with one line naming the first missing,
unexpected or wrongly-shaped tensor, and wraps the file's bytes for the torch path.
"""

from __future__ import annotations

import torch

from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.model.specs import TensorSpec, check_tensors, ignore_prefixes, weights_by_type
from llmkit.quant.dequant import SUPPORTED_TYPES
from llmkit.quant.tensor import QTensor

__all__ = ["TensorSpec", "ignore_prefixes", "load_tensors", "weights_by_type"]


def load_tensors(gf: GGUFFile, specs: list[TensorSpec], ignore_prefixes: tuple[str, ...] = ()):
    """Map every spec'd tensor to a QTensor; error on missing/unexpected/mis-shaped/unsupported ones
    (specs.check_tensors). Tensors under `ignore_prefixes` are left unread."""
    return {
        name: QTensor(name, info.qtype, tuple(info.shape), torch.from_numpy(gf.raw(name)),
                      mapped=True)
        for name, info in check_tensors(gf, specs, SUPPORTED_TYPES, ignore_prefixes).items()
    }  # fmt: skip
