"""x8 groups: the weight layout the x86 group kernels read without a transposition.

The native CPU kernels compute 8 weight rows at once, one per vector lane. From the GGUF rows that
needs each block of the 8 rows gathered and transposed into lanes first, which on Zen 4 costs as
much as the dot products of 2-3 activation rows. `llk_pack_x8` (kernels/native/pack.c) stores the
32-value types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL) and Q4_K Q5_K Q6_K that way once, at load: the
same bytes, moved, so results do not change; a group of 8 rows becomes one linear stream of
vector loads.

Memory: the packed copy replaces the mmap as the weight store, on its own anonymous pages
(llmkit/pages.py). For a matrix read from the GGUF mapping (`release`), pack.c drops the mapping's
pages as it goes (they read back from the file if anything, e.g. an embedding lookup of a tied
head, touches them again), so the peak holds at most ~1 MB of both per thread. Packing happens
only where the selected ISA path reads a type's x8 groups natively (`llk_x8_native`: x86);
another path (a test forcing `scalar`) still reads them, one group unpacked at a time.
Torch-free: numpy arrays in and out (the torch path views its tensors' memory as arrays).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.pages import zero_array

LAYOUT_ROWS, LAYOUT_X8 = 0, 1  # llk.h's LLK_LAYOUT_*
X8_TYPES = frozenset(
    {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.IQ4_NL, QT.Q4_K, QT.Q5_K, QT.Q6_K}
)


def gather_rows(lib, rows: np.ndarray, ids: np.ndarray, span: int = 1 << 20) -> np.ndarray:
    """rows[ids] (rows: uint8 [N, row_bytes] viewing a read-only file mapping), copied window by
    window of `span` bytes of the mapping, each window dropped from the process once read: a row
    subset (a draft head's shortlist of a packed, tied LM head) never brings the matrix back in.
    Windows, not counts of rows: a fault maps the pages around it too (64 KiB on Linux), so sparse
    rows would otherwise bring in much more than themselves."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    out = zero_array((ids.size, rows.shape[1]), rows.dtype)  # transient: freed to the OS
    stride = rows.strides[0]
    windows = sorted_ids * stride // span
    starts = np.flatnonzero(np.r_[True, windows[1:] != windows[:-1]]) if ids.size else []
    bounds = [*map(int, starts), ids.size]
    base = rows.ctypes.data
    for a, b in zip(bounds[:-1], bounds[1:]):
        w = int(windows[a])
        out[order[a:b]] = rows[sorted_ids[a:b]]
        lo = w * span // stride  # the window's first row (the one it starts inside)
        hi = min(rows.shape[0], -(-(w + 1) * span // stride))
        lib.llk_drop_pages(base + lo * stride, (hi - lo) * stride)
    return out


def pack_x8(lib, w: np.ndarray, qtype: QT, release: bool = False) -> np.ndarray | None:
    """w (uint8 [N, row_bytes], contiguous rows) as x8 groups: uint8 [ceil(N / 8) * 8, row_bytes],
    or None where the current ISA path has no x8 kernel for qtype, or no memory is left for the
    copy (keep the rows)."""
    if qtype not in X8_TYPES or w.shape[0] == 0 or not lib.llk_x8_native(int(qtype)):
        return None
    n, rb = w.shape
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    k = rb // block_bytes * block
    try:  # own pages: a packed matrix is never left in the heap (its free lists kept resident)
        out = zero_array(((n + 7) // 8 * 8, rb), np.uint8)
    except (RuntimeError, OSError, MemoryError):  # no room for a copy: read the rows in place
        return None
    rc = lib.llk_pack_x8(
        w.ctypes.data, w.strides[0], n, k, int(qtype), out.ctypes.data, int(release)
    )
    if rc:
        raise LlmkitError(f"packing {qtype.name} {n}x{k} into x8 groups failed ({rc})")
    return out
