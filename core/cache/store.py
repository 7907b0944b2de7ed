"""KV element storage shared by the contiguous cache and the paged pool: per-layer buffers
[Hkv, slots, D] of a float dtype, or of ggml blocks (q8_0 / q4_0) quantized on write with ggml's
reference formulas (per head vector) and dequantized for the torch attention path."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.quant.dequant import dequantize, row_bytes
from llmkit.quant.quantize import quantize

# Cache element types: float dtypes are stored as is; ggml block types are quantized on write (ggml's
# reference formulas, per head vector) and dequantized to fp32 for attention.
KV_TYPES = {
    "f16": torch.float16,
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "q8_0": QT.Q8_0,
    "q4_0": QT.Q4_0,
}


def alloc(kind: str, n_head: int, cap: int, dim: int, device) -> torch.Tensor:
    t = KV_TYPES[kind]
    if isinstance(t, torch.dtype):
        return torch.zeros(n_head, cap, dim, dtype=t, device=device)
    if dim % 32:
        raise LlmkitError(
            f"{kind} KV cache needs a head dimension that is a multiple of 32 (got {dim})"
        )
    return torch.zeros(n_head, cap, row_bytes(t, dim), dtype=torch.uint8, device=device)


def store(buf: torch.Tensor, kind: str, slots: torch.Tensor, x: torch.Tensor) -> None:
    # x: [T, H, D] -> buf[:, slots]
    t = KV_TYPES[kind]
    x = x.transpose(0, 1)
    buf[:, slots] = x.to(t) if isinstance(t, torch.dtype) else quantize(x, t)


def load(buf: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    t = KV_TYPES[kind]
    return buf[:, :n] if isinstance(t, torch.dtype) else dequantize(buf[:, :n], t)


def gather(buf: torch.Tensor, kind: str, idx: torch.Tensor) -> torch.Tensor:
    """Slots `idx` of a buffer, dequantized (the paged pool reads a sequence's blocks)."""
    t = KV_TYPES[kind]
    x = buf[:, idx]
    return x if isinstance(t, torch.dtype) else dequantize(x, t)
