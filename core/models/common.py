"""What every architecture file provides, and the two pieces they all share (embedding, LM head).

An architecture module defines `Config` (a dataclass read from GGUF metadata), `tensor_specs(cfg)`
(the tensor contract as data) and `Model` with:
  * `kv_layout() -> {layer: LayerKV}`: the cache geometry it needs (full or sliding, per layer);
  * `forward(tokens [T], cache, logits="last"|"all") -> [n, n_vocab]` logits in fp32.
Positions come from `cache.positions(T)` and attention from `cache.attention(...)`, so a
multi-sequence batch cache (core/multiseq.py) can give each row its own sequence.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels.dispatch import Backend, make_linear
from llmkit.quant.tensor import QTensor


class Embedding:
    """Token lookup that dequantizes only the rows it needs, straight from the GGUF blocks."""

    def __init__(self, weight: QTensor, scale: float | None = None):
        self.weight, self.scale = weight, scale

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.weight.rows(tokens.to(self.weight.raw.device))  # [T, n_embd] fp32
        return x * self.scale if self.scale is not None else x


def lm_head(backend: Backend, tensors: dict[str, QTensor]):
    """`output.weight`, or the token embedding when the head is tied (no output tensor)."""
    return make_linear(backend, tensors.get("output.weight") or tensors["token_embd.weight"])


def select_rows(x: torch.Tensor, logits) -> torch.Tensor:
    """Rows that get logits: "last", "all", or a slice (perplexity scores only part of a chunk)."""
    if logits == "last":
        return x[-1:]
    if logits == "all":
        return x
    if isinstance(logits, slice):
        return x[logits]
    raise ValueError(f"logits must be 'last', 'all' or a slice, not {logits!r}")


def begin_mtp_batch(model, head: int, tokens: torch.Tensor, h: torch.Tensor, cache) -> torch.Tensor:
    """The checks and cache set-up every `mtp_forward` starts with: `head` is loaded, h is [T, H]
    (one hidden row per token). Returns the batch positions [T]."""
    if not 0 <= head < model.n_mtp_heads:
        raise LlmkitError(f"MTP head {head} is not loaded ({model.n_mtp_heads} heads)")
    T, H = tokens.numel(), model.config.n_embd
    if tuple(h.shape) != (T, H):
        raise LlmkitError(f"MTP hidden must be [{T}, {H}], got {list(h.shape)}")
    pos = cache.positions(T)
    cache.begin(pos)
    return pos
