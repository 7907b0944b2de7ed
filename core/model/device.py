"""Running a model on an accelerator while the rest of llmkit keeps CPU tensors.

The generation loops, samplers and MTP bookkeeping work on CPU tensors (token ids, logits rows,
hidden states of a few rows). On a GPU the weights (GGUF bytes, norms) and KV caches live on the
device; `OnDevice` moves the small per-step inputs there and the outputs back, so the loops need
no device logic. Per decode step that is one [1] id in and one [1, n_vocab] logits row out.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from llmkit.core.cache.kv import KVCache
from llmkit.core.decode.cuda_graph import GraphDecoder, graphs_enabled
from llmkit.quant.tensor import QTensor


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
    """Wraps an architecture's Model: same methods, CPU tensors in and out. On a CUDA device a
    plain decode step (one token, its logits, a KVCache read by the Triton attention kernel) is
    replayed as a CUDA graph (core/cuda_graph.py), one GraphDecoder per cache."""

    def __init__(self, model, device: torch.device):
        self._model, self._device = model, device
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _graph_decoder(self, tokens, cache, args, kwargs):
        if (
            self._device.type != "cuda"
            or tokens.numel() != 1
            or args
            or kwargs.get("logits", "last") != "last"
            or kwargs.get("hidden", False)
            or not getattr(self._model, "cuda_graphs", True)
            or type(cache) is not KVCache
            or cache.attn_kernel != "triton"
            or not graphs_enabled()
        ):
            return None
        dec = self._graphs.get(cache)
        if dec is None:
            dec = self._graphs[cache] = GraphDecoder(self._model, cache)
        return dec

    def forward(self, tokens: torch.Tensor, cache, *args, **kwargs):
        dec = self._graph_decoder(tokens, cache, args, kwargs)
        if dec is not None:
            return dec(tokens).cpu()
        return _cpu(self._model.forward(tokens.to(self._device), cache, *args, **kwargs))

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.lm_logits(x.to(self._device)).cpu()

    def mtp_forward(self, j: int, tokens: torch.Tensor, h: torch.Tensor, cache, *args, **kwargs):
        d = self._device
        return _cpu(self._model.mtp_forward(j, tokens.to(d), h.to(d), cache, *args, **kwargs))
