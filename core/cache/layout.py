"""What one attention layer needs from a KV cache: the geometry a model declares per layer."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError


@dataclass(frozen=True)
class LayerKV:
    """What one attention layer needs from the cache (the model's declared layout)."""

    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    window: int | None = None  # sliding window in tokens (None = full attention)


def check_window_kept(group: str, window: int, slot_pos, p: int) -> None:
    """A rollback to position p keeps a sliding ring only if it still holds the window before p:
    `slot_pos` (the position each slot holds, -1 empty; a numpy array or a tensor) must have
    every one of positions p - min(p, window) .. p - 1, else a one-line error."""
    need = min(p, window)
    have = int(((slot_pos >= p - need) & (slot_pos < p)).sum())
    if have != need:
        raise LlmkitError(
            f"cannot roll back to position {p}: the {group} ring already overwrote "
            f"{need - have} positions still inside the window"
        )
