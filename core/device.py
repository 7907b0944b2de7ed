"""Running a model on an accelerator while the rest of llmkit keeps CPU tensors.

The generation loops, samplers and MTP bookkeeping work on CPU tensors (token ids, logits rows,
hidden states of a few rows). On a GPU the weights (GGUF bytes, norms) and KV caches live on the
device; `OnDevice` moves the small per-step inputs there and the outputs back, so the loops need
no device logic. Per decode step that is one [1] id in and one [1, n_vocab] logits row out.
"""

from __future__ import annotations

import dataclasses

import torch

from llmkit.core.weights import QTensor


def tensors_to(tensors: dict[str, QTensor], device: torch.device) -> dict[str, QTensor]:
    """The same tensors with their stored bytes copied to `device` once (matmul kernels read them
    there in place; norms and embedding rows are decoded there)."""
    return {n: dataclasses.replace(t, raw=t.raw.to(device)) for n, t in tensors.items()}


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    return x


class OnDevice:
    """Wraps an architecture's Model: same methods, CPU tensors in and out."""

    def __init__(self, model, device: torch.device):
        self._model, self._device = model, device

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, tokens: torch.Tensor, cache, *args, **kwargs):
        return _cpu(self._model.forward(tokens.to(self._device), cache, *args, **kwargs))

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.lm_logits(x.to(self._device)).cpu()

    def mtp_forward(self, j: int, tokens: torch.Tensor, h: torch.Tensor, cache, *args, **kwargs):
        d = self._device
        return _cpu(self._model.mtp_forward(j, tokens.to(d), h.to(d), cache, *args, **kwargs))
