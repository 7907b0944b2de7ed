"""Architectures as data, without torch: per `general.architecture`, the typed config read from
GGUF metadata, the tensor table, and the plan of one decoder block as the native whole-block
call runs it. core/models/<arch>.py builds the torch graph on the same config and table;
core/lean/ runs the plan torch-free (the architectures listed in `NATIVE`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from llmkit.kernels.native_bind import BlockShape

NATIVE = ("llama", "gemma3")  # general.architecture values with a torch-free block plan


@dataclass(frozen=True)
class BlockPlan:
    """One pre-norm attention + GLU block: its heads, RoPE mode and scales (`shape`, the per-head
    norms left unset: the runtime binds their weights), the RoPE table `rope` (n_rot, base,
    freq_scale, GGUF name of the frequency factors or None), the GLU's activation, and the GGUF
    names (without "blk.N." and ".weight") of the norms: attn, post attn, ffn, post ffn, and the
    per-head q / k norms (None: absent)."""

    shape: BlockShape
    rope: tuple
    glu: str
    norms: tuple[str, str | None, str, str | None]
    qk_norms: tuple[str | None, str | None] = (None, None)


def arch_spec(arch: str):
    """The torch-free module of a native-plan architecture (core/archs/<arch>.py)."""
    if arch not in NATIVE:
        raise KeyError(arch)
    return importlib.import_module(f"llmkit.core.archs.{arch}")
