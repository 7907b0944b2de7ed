"""RoPE angle tables as numpy arrays: the one function both the torch path (kernels/rope.py) and
the torch-free CPU path (core/lean/) read their cos/sin rows from, so both rotate by the same bits.

theta_i(p) = freq_scale * p * base^(-2i/n_rot) / factor_i, evaluated in float64 and rounded to
fp32 once. Cost: 2 * n * n_rot / 2 transcendental evaluations per table (built once per
configuration and grown by doubling, never per step).
"""

from __future__ import annotations

import numpy as np


def rope_table(n: int, n_rot: int, base: float, freq_scale: float = 1.0, factors=None):
    """(cos, sin), fp32 [n, n_rot / 2] for positions 0 .. n - 1; `factors`: per-frequency
    divisors (Llama 3's rope_freqs), any array-like of at least n_rot / 2 values, or None."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    inv = base ** (-2.0 * i / n_rot)
    if factors is not None:
        inv = inv / np.asarray(factors, dtype=np.float64)[: n_rot // 2]
    theta = np.arange(n, dtype=np.float64)[:, None] * (inv * freq_scale)[None, :]
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def table_size(n_need: int) -> int:
    """Rows a table holding positions below n_need gets: a power of two, at least 1024."""
    return max(1024, 1 << (max(n_need, 1) - 1).bit_length())
