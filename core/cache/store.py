"""KV element storage shared by the contiguous cache and the paged pool: per-layer buffers
[Hkv, slots, D] of a float dtype, or of ggml blocks (q8_0 / q4_0) quantized on write with ggml's
reference formulas (per head vector) and dequantized for the torch attention path, or of turbo3 /
turbo4 codes (core/cache/turbo.py), read in their rotated basis by `turbo.attention`."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.cache.turbo import TURBO_TYPES, TurboType
from llmkit.errors import LlmkitError
from llmkit.pages import zero_pages
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
    **TURBO_TYPES,  # rotated Lloyd-Max codes, read in the rotated basis (core/cache/turbo.py)
}


def buffer_bytes(kind: str, n_head: int, cap: int, dim: int) -> int:
    """Bytes of one layer's K or V buffer [n_head, cap, dim] of cache type `kind`."""
    t = KV_TYPES[kind]
    if isinstance(t, torch.dtype):
        return n_head * cap * dim * t.itemsize
    if isinstance(t, TurboType):
        return n_head * cap * t.row_bytes(dim)
    if dim % 32:
        raise LlmkitError(
            f"{kind} KV cache needs a head dimension that is a multiple of 32 (got {dim})"
        )
    return n_head * cap * row_bytes(t, dim)


def available_bytes(device) -> int | None:
    """Memory a new allocation can take: MemAvailable + free swap on a CPU (Linux), free device
    memory on a GPU; None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        info = dict(
            (line.split(":")[0], int(line.split()[1]) * 1024)
            for line in open("/proc/meminfo")
            if line.split()[1:2] and line.split()[1].isdigit()
        )
    except OSError:
        return None
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"] + info.get("SwapFree", 0)


def check_fits(nbytes: int, device, what: str) -> None:
    """Refuse, before allocating, what the machine cannot hold (a huge -c, a lying header)."""
    avail = available_bytes(device)
    if avail is not None and nbytes > avail:
        raise LlmkitError(
            f"{what} needs {nbytes / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB of memory "
            f"is available (lower -c or use a smaller KV cache type)"
        )


def alloc(kind: str, n_head: int, cap: int, dim: int, device) -> torch.Tensor:
    """A zeroed K or V buffer [n_head, cap, ...]. On a CPU it is a private anonymous mapping:
    zero until written, and a page takes memory only once a slot in it is written (a context of
    4096 that holds 100 tokens costs their pages, not the whole buffer, as a memset would)."""
    t = KV_TYPES[kind]
    buffer_bytes(kind, n_head, cap, dim)  # the head-dim check
    shape = (n_head, cap, buffer_bytes(kind, n_head, 1, dim) // n_head)
    if isinstance(t, torch.dtype):
        shape = (n_head, cap, dim)
    dtype = t if isinstance(t, torch.dtype) else torch.uint8
    try:
        if torch.device(device).type == "cpu":
            return zero_pages(shape, dtype)
        return torch.zeros(*shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError, OSError):  # what check_fits could not foresee
        raise LlmkitError(f"cannot allocate a KV cache buffer of shape {list(shape)}") from None


def store(buf: torch.Tensor, kind: str, slots: torch.Tensor, x: torch.Tensor) -> None:
    # x: [T, H, D] -> buf[:, slots]
    t = KV_TYPES[kind]
    x = x.transpose(0, 1)
    if isinstance(t, TurboType):
        buf[:, slots] = t.quantize(x)
        return
    buf[:, slots] = x.to(t) if isinstance(t, torch.dtype) else quantize(x, t)


def load(buf: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    t = KV_TYPES[kind]
    if isinstance(t, TurboType):  # the rotated basis: see turbo.attention
        return t.dequantize_rotated(buf[:, :n])
    return buf[:, :n] if isinstance(t, torch.dtype) else dequantize(buf[:, :n], t)


def gather(buf: torch.Tensor, kind: str, idx: torch.Tensor) -> torch.Tensor:
    """Slots `idx` of a buffer, dequantized (the paged pool reads a sequence's blocks)."""
    t = KV_TYPES[kind]
    x = buf[:, idx]
    if isinstance(t, TurboType):  # the rotated basis: see turbo.attention
        return t.dequantize_rotated(x)
    return x if isinstance(t, torch.dtype) else dequantize(x, t)
