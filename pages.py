"""Buffers on private anonymous pages: zero until written, resident only where written, and
returned to the OS when freed (never left in the heap's free lists). The KV cache's per-layer
buffers (core/cache/store.py) and the weights packed into x8 groups (kernels/cpu_pack.py) take
them; where the platform lacks such mappings, or for less than a page, a plain zeroed tensor."""

from __future__ import annotations

import math
import mmap

import torch

_ANON = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)


def zero_pages(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor of `shape` on its own anonymous mapping (torch.zeros below a page)."""
    n = math.prod(shape) * dtype.itemsize
    if n < mmap.PAGESIZE or None in _ANON:
        return torch.zeros(*shape, dtype=dtype)
    buf = mmap.mmap(-1, n, flags=_ANON[0] | _ANON[1])
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # keeps `buf` alive
