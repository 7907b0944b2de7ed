"""Running a model on an accelerator while the rest of llmkit keeps CPU tensors.

The generation loops, samplers and MTP bookkeeping work on CPU tensors (token ids, logits rows,
hidden states of a few rows). On a GPU the weights (GGUF bytes, norms) and KV caches live on the
device; `OnDevice` moves the small per-step inputs there and the outputs back, so the loops need
no device logic. Per decode step that is one [1] id in and one [1, n_vocab] logits row out.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import torch

from llmkit.core.cache.kv import KVCache
from llmkit.core.model.cuda_graph import GraphDecoder, graphs_enabled
from llmkit.core.model.protocol import CausalLM, DraftHeads, ForwardOutput, Rows
from llmkit.kernels import ops
from llmkit.quant.tensor import QTensor


def tensors_to(tensors: dict[str, QTensor], device: torch.device) -> dict[str, QTensor]:
    """The same tensors with their stored bytes copied to `device` once (matmul kernels read them
    there in place; norms and embedding rows are decoded there)."""
    return {n: dataclasses.replace(t, raw=t.raw.to(device)) for n, t in tensors.items()}


def _cpu(out: ForwardOutput) -> ForwardOutput:
    logits = out.logits.cpu() if out.logits is not None else None
    return ForwardOutput(logits, out.hidden.cpu())


class _HeadsOnDevice:
    """The model's NextN heads with CPU tensors in and out."""

    def __init__(self, heads: DraftHeads, device: torch.device):
        self._heads, self._device = heads, device
        self.n_heads, self.n_vocab = heads.n_heads, heads.n_vocab

    def kv_layout(self) -> dict:
        return self._heads.kv_layout()

    def set_draft_vocab(self, ids) -> None:
        self._heads.set_draft_vocab(ids)

    def forward(self, head: int, tokens, h, cache, logits: Rows = "last") -> ForwardOutput:
        d = self._device
        return _cpu(self._heads.forward(head, tokens.to(d), h.to(d), cache, logits))

    def draft_logits(self, head: int, x):
        z, ids = self._heads.draft_logits(head, x.to(self._device))
        return z.cpu(), ids.cpu() if ids is not None else None

    def draft_step(self, head: int, tokens, h, cache, rows: list[int]):
        d = self._device
        x, z, ids = self._heads.draft_step(head, tokens.to(d), h.to(d), cache, rows)
        return x.cpu(), z.cpu(), ids.cpu() if ids is not None else None


class OnDevice:
    """Wraps an architecture's Model (the CausalLM contract, CPU tensors in and out). On a CUDA
    device a plain decode step (one token, its logits, a KVCache whose attention kernel can be
    captured) is replayed as a CUDA graph (core/model/cuda_graph.py), one GraphDecoder per
    cache."""

    supports_cuda_graphs: ClassVar[bool] = False  # the wrapped model's graphs are inside

    def __init__(self, model: CausalLM, device: torch.device):
        self.model, self._device = model, device
        self.config = model.config
        self.mtp = _HeadsOnDevice(model.mtp, device) if model.mtp is not None else None
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def kv_layout(self) -> dict:
        return self.model.kv_layout()

    def _graph_decoder(self, tokens: torch.Tensor, cache, logits: Rows) -> GraphDecoder | None:
        if (
            self._device.type != "cuda"
            or tokens.numel() != 1
            or logits != "last"
            or not self.model.supports_cuda_graphs
            or type(cache) is not KVCache
            or not ops.supports_graph_capture(cache.attn_kernel)
            or not graphs_enabled()
        ):
            return None
        dec = self._graphs.get(cache)
        if dec is None:
            dec = self._graphs[cache] = GraphDecoder(self.model, cache)
        return dec

    def forward(
        self, tokens: torch.Tensor, cache, logits: Rows = "last", n_layer: int | None = None
    ) -> ForwardOutput:
        """A graph-replayed step returns the logits only: its hidden is not kept (an empty
        [0, H] tensor); callers that need hidden states ask for other rows or drafts. An early
        exit (`n_layer`) is never graph-replayed."""
        dec = self._graph_decoder(tokens, cache, logits) if n_layer is None else None
        if dec is not None:
            return ForwardOutput(dec(tokens).cpu(), torch.empty(0, self.config.n_embd))
        exit_at = {} if n_layer is None else {"n_layer": n_layer}
        return _cpu(self.model.forward(tokens.to(self._device), cache, logits, **exit_at))

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_logits(x.to(self._device)).cpu()
