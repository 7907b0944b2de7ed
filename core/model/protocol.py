"""The model contract: what every architecture provides, and all that the loader, the decode loop,
the drafters, the trainer and the server may rely on (they never probe for attributes).

    out = model.forward(tokens, cache, logits="last")   # ForwardOutput(logits [1, V], hidden [T, H])
    row = model.lm_logits(out.hidden[-1:])              # the same logits from a hidden row
    if model.mtp is not None:                            # NextN (MTP) heads, loaded with --mtp
        d = model.mtp.forward(0, tokens, hidden_prev, mtp_cache)

Logits are fp32. The hidden state is the residual stream after the last trunk layer, before the
output norm: what NextN heads take, and what `lm_logits` turns into logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from llmkit.core.cache.layout import LayerKV
from llmkit.core.model.config import ModelConfig

if TYPE_CHECKING:  # annotations only: the torch-free runtime (core/lean/) speaks it too
    import torch

# rows that get logits: the last one, all, a slice (perplexity scores part of a chunk), or none
# (the caller applies `lm_logits` to the rows it needs)
Rows = Literal["last", "all"] | slice | None


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [n, V] fp32 for the requested rows (None when rows=None)
    hidden: torch.Tensor  # [T, H] pre-norm hidden state of every row (numpy arrays on core/lean/)

    def __iter__(self):  # logits, hidden = model.forward(...)
        return iter((self.logits, self.hidden))


class Attention(Protocol):
    """What a decoder block needs from its cache: write k/v of layer il, attend q over it."""

    def attend(
        self, il: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor: ...

    def native_step(self, il: int) -> tuple | None:
        """Layer il's arguments for a whole-block native call (kernels/cpu_block.py: this
        step's bound K/V buffers, slots, positions, mask), or None: the block then calls
        `attend` between its own kernels (another cache layout or attention kernel)."""
        ...


class Cache(Attention, Protocol):
    """A batch's cache: KVCache (one sequence), BatchCache (several, paged), or a test double."""

    def positions(self, T: int) -> torch.Tensor: ...

    def begin(self, pos: torch.Tensor) -> None: ...

    def native_stack(self, layers: tuple[int, ...]) -> tuple | None:
        """This step's arguments for one native call over the blocks of `layers`
        (kernels/cpu_block.StackSite), or None: the blocks then run one by one."""
        ...


class DraftHeads(Protocol):
    """NextN (MTP) blocks: head j reads (token at p, hidden of p - 1) and predicts token p + 1."""

    n_heads: int
    n_vocab: int  # the target's vocabulary (draft logits may cover a shortlist of it)

    def kv_layout(self) -> dict[int, LayerKV]: ...

    def forward(
        self, head: int, tokens: torch.Tensor, h: torch.Tensor, cache: Cache, logits: Rows = "last"
    ) -> ForwardOutput: ...

    def draft_logits(
        self, head: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def draft_step(
        self, head: int, tokens: torch.Tensor, h: torch.Tensor, cache: Cache, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """forward(..., logits=None).hidden and draft_logits(head, hidden[rows]) in one."""
        ...

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None: ...


class CausalLM(Protocol):
    config: ModelConfig
    supports_cuda_graphs: ClassVar[bool]  # a decode step can be captured (no host-side routing)
    mtp: DraftHeads | None  # NextN heads (only when loaded with mtp=True)

    def kv_layout(self) -> dict[int, LayerKV]: ...

    def forward(
        self, tokens: torch.Tensor | list[int], cache: Cache, logits: Rows = "last",
        n_layer: int | None = None,
    ) -> ForwardOutput:  # fmt: skip
        """tokens: int64 [T] or a list of ids (the decode loop's; `token_ids`). n_layer: run only
        the first n_layer trunk layers (early exit: the hidden is then that layer's output, and
        `lm_logits` applies the output norm and head to it)."""
        ...

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor: ...
