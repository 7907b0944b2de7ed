"""What a drafter gives the decode loop, without torch: a `Draft`, the `Drafter` protocol (one
sequence: `llm run`, `llm bench`) and `BatchDrafter` (many sequences: the server's slots). The
drafters themselves live in core/decode/drafter.py (NextN heads), assistant.py and early_exit.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# pick(logits [V]) -> (token, q, p): q the dense draft distribution it was drawn from (None when
# greedy), p its probability of the token (for --draft-p-min)
Pick = Callable[["torch.Tensor"], tuple[int, object, float]]  # q: a numpy array or None


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    qs: list = field(default_factory=list)  # draft distributions (sampling) or None (greedy)
    alts: list[int] = field(default_factory=list)  # siblings of tokens[0] for a draft tree


class Drafter(Protocol):
    """One sequence's drafter, as the decode loop uses it."""

    max_draft: int  # the longest draft it can make

    def observe(self, p0: int, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """The target evaluated `tokens` at positions p0.. with pre-norm hidden states."""

    def draft(self, last: int, k: int, pick: Pick, p_min: float, branches: int) -> Draft:
        """Up to k tokens after `last` (sampled at position n_past, in no cache yet)."""

    def rollback(self, p: int) -> None:
        """Forget positions >= p."""

    def plan(self) -> dict: ...


class BatchDrafter(Protocol):
    """Drafting for many sequences at once (the server's slots), with one state per sequence:
    `NextNDrafter` (its own KV per head) and the Gemma 4 assistant (core/decode/assistant.py: no KV,
    it reads the target's). Each `draft` is one drafter forward per step over every job's row(s)."""

    shares_prefix: bool  # whether a sequence may start from a prompt prefix it never observed

    def open(self, target=None):
        """A new sequence's state; `target`: that sequence's own target KV (cache or paged seq)."""

    def close(self, state) -> None: ...

    def observe(self, state, p0: int, tokens: torch.Tensor, hidden: torch.Tensor) -> None: ...

    def catch_up(self, states: list) -> None:
        """Whatever the observed rows still need before the states draft (NextN: mirroring)."""

    def draft(self, jobs: list, p_min: float = 0.0) -> list[Draft]: ...

    def plan(self) -> dict:
        """What was reserved at start-up for every sequence (reported in /slots)."""
