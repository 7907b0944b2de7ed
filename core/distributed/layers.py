"""The sharded pieces of a tensor-parallel model: linears that combine across ranks, the
vocabulary-parallel embedding and LM head, experts split across ranks, and the sampler that keeps
every rank on rank 0's tokens.

The linears subclass `NativeLinear` only so that `ops.linear` hands them its whole fused call
(norm, GLU, post-norm, residual): they decide where each step runs. On other kernel families
`ops.linear` calls them as plain matmuls and does the fused steps itself.
"""

from __future__ import annotations

import torch

from llmkit.core.distributed.group import Group
from llmkit.kernels import ops
from llmkit.kernels.cpu_native import NativeLinear


def _fused(lin, x, norm=None, glu=None, post_norm=None, residual=None):
    """One local linear with its fused steps, through the kernel table."""
    act = "gelu_tanh" if glu == "gelu_fp16" else glu
    return ops.linear(lin, x, norm=norm, glu_act=act, post_norm=post_norm, residual=residual)


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """ops.linear's `out=` contract: the result written into the caller's buffer when given."""
    if out is None:
        return y
    out.copy_(y)
    return out


class GatherRows(NativeLinear):
    """A linear cut by output rows whose full output every rank needs: local rows, then an
    all-gather. `gather_input`: the input arrives cut as well (attention heads, the FFN's F
    slice, `in_sizes` per rank; with a GLU each rank's part is [gate_r | up_r]) and is
    all-gathered first. Every output element is the unsharded kernel's: bit-identical."""

    def __init__(self, inner, group: Group, out_sizes: list[int], in_sizes: list[int] | None):
        self.inner, self.group = inner, group
        self.out_sizes, self.in_sizes = out_sizes, in_sizes
        r = group.rank
        self.lo, self.hi = sum(out_sizes[:r]), sum(out_sizes[: r + 1])
        self.in_features = inner.in_features
        self.out_features = sum(out_sizes)

    def _input(self, x: torch.Tensor, glu: bool) -> torch.Tensor:
        if self.in_sizes is None:
            return x
        if not glu:
            return self.group.all_gather(x, 1, self.in_sizes)
        parts = self.group.all_gather(x, 1, [2 * n for n in self.in_sizes])
        halves = parts.split([n for n in self.in_sizes for _ in (0, 1)], dim=1)
        return torch.cat(halves[0::2] + halves[1::2], dim=1).contiguous()

    def __call__(self, x: torch.Tensor, out=None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.inner(self._input(x.reshape(-1, x.shape[-1]), False))
        return self.group.all_gather(y, 1, self.out_sizes).view(*lead, -1)

    def fused(self, x, norm=None, glu=None, post_norm=None, residual=None, out=None):
        return _into(out, self._fused(x, norm, glu, post_norm, residual))

    def _fused(self, x, norm, glu, post_norm, residual) -> torch.Tensor:
        xf = self._input(x, glu is not None)
        if post_norm is None:  # the residual's columns of this rank go into the local call
            res = residual[:, self.lo : self.hi].contiguous() if residual is not None else None
            return self.group.all_gather(_fused(self.inner, xf, norm, glu, None, res), 1,
                                         self.out_sizes)  # fmt: skip
        y = self.group.all_gather(_fused(self.inner, xf, norm, glu), 1, self.out_sizes)
        y = ops.rms_norm(y, *post_norm)
        return y if residual is None else residual + y

    def __repr__(self) -> str:
        return f"GatherRows({self.inner!r}, rows {self.lo}:{self.hi} of {self.out_features})"


class SumColumns(NativeLinear):
    """A linear cut by input columns (Megatron's row-parallel layer): the local partial product
    of this rank's input slice, summed over ranks in rank order, then post-norm and residual."""

    def __init__(self, inner, group: Group):
        self.inner, self.group = inner, group
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def __call__(self, x: torch.Tensor, out=None) -> torch.Tensor:
        return self.group.sum(self.inner(x))

    def fused(self, x, norm=None, glu=None, post_norm=None, residual=None, out=None):
        y = self.group.sum(_fused(self.inner, x, norm, glu))
        if post_norm is not None:
            y = ops.rms_norm(y, *post_norm)
        return _into(out, y if residual is None else residual + y)

    def __repr__(self) -> str:
        return f"SumColumns({self.inner!r})"


class VocabEmbedding:
    """Token lookup over this rank's vocabulary rows: the other rows are zeros, and the sum over
    ranks (one value and zeros) is exactly the looked-up row."""

    def __init__(self, embed, group: Group, lo: int, hi: int):
        self.embed, self.group, self.lo, self.hi = embed, group, lo, hi
        self.weight, self.scale = embed.weight, embed.scale

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.reshape(-1)
        mine = (tokens >= self.lo) & (tokens < self.hi)
        idx = torch.where(mine, tokens - self.lo, torch.zeros_like(tokens))
        x = self.embed(idx) * mine.to(torch.float32)[:, None].to(self.weight.raw.device)
        return self.group.sum(x)


class ShardedExperts:
    """A MoE layer whose experts are split across ranks: each rank runs the selected experts it
    holds; the weighted outputs of every (row, slot) are gathered and added in the order of the
    unsharded layer (ascending expert id), so the result is bit-identical."""

    def __init__(self, moe, group: Group, lo: int, hi: int):
        self.moe, self.group, self.lo, self.hi = moe, group, lo, hi

    def __call__(self, f: torch.Tensor, k: int) -> torch.Tensor:
        m = self.moe
        top, w = m.route(f, k)
        contrib = f.new_zeros(f.shape[0], k, f.shape[1])
        experts = torch.unique(top).tolist()
        for e in experts:
            if not self.lo <= e < self.hi:
                continue
            rows, slot = (top == e).nonzero(as_tuple=True)
            x = f[rows]
            el = e - self.lo
            y = m.down(_swiglu(m.gate(x, el), m.up(x, el), m.limit), el)
            contrib[rows, slot] = y * w[rows, slot, None]
        contrib = self.group.sum(contrib)
        out = torch.zeros_like(f)
        for e in experts:
            rows, slot = (top == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, contrib[rows, slot])
        return out


def _swiglu(gate, up, limit):
    from llmkit.core.models.moe import swiglu

    return swiglu(gate, up, limit)


class RankSampler:
    """The run's sampler on every rank, with rank 0's choices: each token (and each uniform draw
    of the acceptance rule) is decided on rank 0 and broadcast, so every rank emits, verifies and
    rolls back the same tokens even if its own arithmetic differed."""

    def __init__(self, inner, group: Group):
        self.inner, self.group = inner, group

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("inner", "group"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def _one(self, fn):
        return self.group.broadcast_object(fn() if self.group.rank == 0 else None)

    def sample(self, logits, history=()) -> int:
        return self._one(lambda: self.inner.sample(logits, history))

    def __call__(self, logits, history=()) -> int:
        return self._one(lambda: self.inner(logits, history))

    def choose(self, logits) -> int:
        return self._one(lambda: self.inner.choose(logits))

    def draw(self, probs) -> int:
        return self._one(lambda: self.inner.draw(probs))

    def uniform(self) -> float:
        return self._one(self.inner.uniform)

    def pick_draft(self, logits):
        if self.group.rank == 0:
            tok, q, p = self.inner.pick_draft(logits)
            self.group.broadcast_object((tok, p))
            return tok, q, p
        tok, p = self.group.broadcast_object(None)
        q = None if self.inner.greedy else self.inner.dist(logits, ())
        return tok, q, p
