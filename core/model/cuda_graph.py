"""Decode steps replayed as CUDA graphs: one launch per token instead of hundreds.

A small model's decode step on a GPU is a few hundred short kernels (norms, RoPE, one GEMV per
weight, attention, the KV writes); launched one by one from Python, the launches cost far more
than the kernels (measured on an H100: a 1.1B Q4_K model decoded at ~54 tokens/s eager, i.e.
~18 ms of launches for ~0.25 ms of weight reads). A graph replays the recorded kernels with
their arguments fixed, so everything that changes per step must live in device buffers:

  * the token id and its position are copied into static buffers before each replay;
  * the KV cache runs in `static_batch` mode: slot bookkeeping is device indexing, and attention
    reads a fixed number of slots (the *bucket*), masking empty or later slots by position;
  * RoPE tables are sized from the bucket (`positions_below`), not read back from the device.

One graph per bucket: the smallest power of two (at least MIN_BUCKET, at most n_ctx) above the
position, so a context of 4096 needs at most 5 graphs and attention reads at most twice the
slots in use. The first step in a new bucket runs eagerly through the same static code (which
compiles kernels and grows tables, and produces that step's logits); the graph is captured
right after it and replayed from the next step on. Prefill, MTP verify and draft steps stay eager.
`LLMKIT_CUDA_GRAPHS=0` turns graphs off (like llama.cpp's GGML_CUDA_DISABLE_GRAPHS).
"""

from __future__ import annotations

import os

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels.rope import positions_below

MIN_BUCKET = 256


def graphs_enabled() -> bool:
    return os.environ.get("LLMKIT_CUDA_GRAPHS", "1") != "0"


class GraphDecoder:
    """Single-token decode steps (T = 1, logits of that token) of `model` over one KVCache.

    capture=False runs the same static-mode step eagerly every time: what the CPU tests check
    (CUDA graphs need a GPU), and a fallback for debugging."""

    def __init__(self, model, cache, capture: bool = True):
        self.model, self.cache = model, cache
        dev = cache.device
        self.capture = capture and dev.type == "cuda"
        self.tok = torch.zeros(1, dtype=torch.int64, device=dev)  # static inputs
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, p: int) -> int:
        """KV slots read by a step at position p: a power of two > p, in [MIN_BUCKET, n_ctx]."""
        return min(self.cache.n_ctx, max(MIN_BUCKET, 1 << p.bit_length()))

    def _step(self, n_read: int) -> torch.Tensor:
        with self.cache.static_batch(self.pos, n_read), positions_below(n_read):
            return self.model.forward(self.tok, self.cache).logits  # [1, V] fp32

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token: int [1] (any device) -> logits [1, V] fp32 on the cache's device."""
        c = self.cache
        p = c.n_past
        if p + 1 > c.n_ctx:
            raise LlmkitError(f"context is full: {p + 1} tokens exceed the context size {c.n_ctx}")
        b = self.bucket(p)
        self.tok.copy_(token.reshape(1))
        self.pos.fill_(p)
        entry = self.graphs.get(b)
        if entry is not None:
            graph, out = entry
            graph.replay()
            c.n_past = p + 1
            return out.clone()  # the graph overwrites `out` at the next replay
        out = self._step(b)
        c.n_past = p + 1
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self._step(b)
            self.graphs[b] = (graph, static_out)
        return out
