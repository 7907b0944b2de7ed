"""Buffers on private anonymous pages: zero until written, resident only where written, and
returned to the OS when freed (never left in the heap's free lists). The KV cache's per-layer
buffers (core/cache/store.py, core/lean/kv.py) and the weights packed into x8 groups
(kernels/cpu_pack.py) take them; where the platform lacks such mappings, or for less than a page,
a plain zeroed array. Torch-free: `zero_pages` wraps the same memory for the torch path."""

from __future__ import annotations

import math
import mmap

import numpy as np

_ANON = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)


def zero_array(shape: tuple, dtype) -> np.ndarray:
    """A zeroed numpy array of `shape` on its own anonymous mapping (np.zeros below a page)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    if n < mmap.PAGESIZE or None in _ANON:
        return np.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, n, flags=_ANON[0] | _ANON[1])
    return np.frombuffer(buf, dtype=dtype).reshape(shape)  # keeps `buf` alive


def zero_pages(shape: tuple, dtype):
    """zero_array as a CPU torch tensor of torch dtype `dtype` (the same pages, viewed)."""
    import torch

    n = math.prod(shape) * dtype.itemsize
    if n < mmap.PAGESIZE or None in _ANON:
        return torch.zeros(*shape, dtype=dtype)
    return torch.from_numpy(zero_array((n,), np.uint8)).view(dtype).view(shape)
