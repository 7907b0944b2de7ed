"""What one attention layer needs from a KV cache: the geometry a model declares per layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerKV:
    """What one attention layer needs from the cache (the model's declared layout)."""

    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    window: int | None = None  # sliding window in tokens (None = full attention)
