"""RoPE angle tables: cos/sin rows for positions, read from a per-configuration table.

theta_i(p) = freq_scale * p * base^(-2i/n_rot) / factor_i. A table holds every position so far
(grown by doubling), so a decode step indexes it instead of evaluating cos/sin; the values are the
same elementwise formula either way.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from llmkit.kernels.rope_table import rope_table, table_size

ROPE_NORM, ROPE_NEOX = 0, 2  # ggml rope modes: adjacent pairs vs split halves

_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_POS_BOUND: list[int] = []  # innermost positions_below() bound, if any
_RETIRED_TABLES: list = []  # tables outgrown by a longer context (doubling: <= the live size)
_FACTOR_KEYS: dict[int, tuple] = {}  # id(live factors tensor) -> its values


@contextlib.contextmanager
def positions_below(n: int):
    """Promise that positions in this block are < n, so rope_cache sizes its table from n
    instead of reading pos.max() back from the device (a CUDA-graph capture cannot)."""
    _POS_BOUND.append(n)
    try:
        yield
    finally:
        _POS_BOUND.pop()


def rope_cache(
    pos: torch.Tensor, n_rot: int, base: float, freq_scale: float = 1.0, factors=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, n_rot/2] for the positions `pos` [T]."""
    fkey = None if factors is None else _factors_key(factors)
    key = (n_rot, float(base), float(freq_scale), fkey, pos.device)
    if pos.dim() == 1 and 0 < pos.numel() <= 16 and not _POS_BOUND and not pos.is_cuda:
        # a CPU decode step or verify batch: consecutive positions are views of the table (the
        # same values as indexing it; an index op costs ~10 us after a streamed weight matrix)
        p = pos.tolist()
        table = _ROPE_TABLES.get(key)
        if table is not None and 0 <= p[0] and p[-1] < table[0].shape[0]:
            if p == list(range(p[0], p[0] + len(p))):
                return table[0][p[0] : p[-1] + 1], table[1][p[0] : p[-1] + 1]
    if _POS_BOUND:
        n_need = _POS_BOUND[-1]
    else:
        n_need = int(pos.max()) + 1 if pos.numel() else 1
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < n_need:
        n = table_size(n_need)
        f = None if factors is None else factors[: n_rot // 2].double().cpu().numpy()
        cos, sin = rope_table(n, n_rot, base, freq_scale, f)  # the same bits on every path
        if key in _ROPE_TABLES:  # a captured CUDA graph may still index the smaller table
            _RETIRED_TABLES.append(_ROPE_TABLES[key])
        table = _ROPE_TABLES[key] = (
            torch.from_numpy(cos).to(pos.device),
            torch.from_numpy(sin).to(pos.device),
        )
    return table[0][pos], table[1][pos]


def _factors_key(factors: torch.Tensor) -> tuple:
    """The factors' values, read from the device once per tensor (a CUDA-graph capture cannot
    read them back, and an address could be reused by another model's tensor)."""
    k = _FACTOR_KEYS.get(id(factors))
    if k is None:
        k = _FACTOR_KEYS[id(factors)] = tuple(factors.tolist())
        weakref.finalize(factors, _FACTOR_KEYS.pop, id(factors), None)  # before id reuse
    return k
