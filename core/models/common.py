"""What the architecture files share: the embedding, the LM head, block weights loaded from a
declared name table, and `DecoderLM`, the one forward pass (embed, blocks, norm, head).

An architecture module (one file per `general.architecture`, see core/model/loader.py) defines:
  * `Config`, a `ModelConfig` dataclass read from GGUF metadata, with `layer_kv(il)`;
  * `tensor_specs(cfg, part, names)`, its tensor contract as data ("trunk" or "mtp");
  * `Block`, one decoder block: `rope` (the key of its RoPE table), `__call__(x, rope, att)` and
    `native_site(x)` (the block as one native call for x's rows, or None: `StepBlock`);
  * `Model(DecoderLM)`, which builds its blocks.
The NextN (MTP) heads reuse the architecture's own Block (core/models/nextn.py).
"""

from __future__ import annotations

from threading import get_ident
from types import SimpleNamespace
from typing import ClassVar

import torch

from llmkit.core.model.config import ModelConfig
from llmkit.core.model.protocol import ForwardOutput, Rows
from llmkit.kernels import cpu_native, ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.rope import rope_cache
from llmkit.quant.tensor import QTensor


def token_ids(tokens) -> torch.Tensor:
    """A forward's tokens as int64 [T]: a tensor as it is, a list of ids converted."""
    return tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, dtype=torch.long)


class Embedding:
    """Token lookup that dequantizes only the rows it needs, straight from the GGUF blocks."""

    def __init__(self, weight: QTensor, scale: float | None = None):
        self.weight, self.scale = weight, scale
        self.lookup = ops.embed_site(weight, scale)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lookup(tokens)  # [T, n_embd] fp32


def lm_head(backend: Backend, tensors: dict[str, QTensor]):
    """`output.weight`, or the token embedding when the head is tied (no output tensor)."""
    return ops.make_linear(backend, tensors.get("output.weight") or tensors["token_embd.weight"])


def head_logits(c: ModelConfig, head, norm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """head(rms(x)), soft-capped when the model declares a cap: logits [n, V] fp32 (the norm is
    the native linear's prologue on a CPU: the same row op, one call)."""
    return softcap(c, ops.linear(head, x, norm=(norm, c.eps)))


def softcap(c: ModelConfig, z: torch.Tensor) -> torch.Tensor:
    """Logits soft-capped when the model declares a cap (tanh(z / cap) * cap), else z."""
    return torch.tanh(z / c.softcap) * c.softcap if c.softcap > 0 else z


def select_rows(x: torch.Tensor, logits: Rows) -> torch.Tensor:
    """Rows that get logits: "last", "all", or a slice (perplexity scores only part of a chunk)."""
    if logits == "last":
        return x[-1:]
    if logits == "all":
        return x
    if isinstance(logits, slice):
        return x[logits]
    raise ValueError(f"logits must be 'last', 'all', a slice or None, not {logits!r}")


def load_block_weights(t: dict[str, QTensor], il: int, backend: Backend, linears, norms):
    """Block il's weights under the table's attribute names: fused linears and fp32 norms."""
    b = f"blk.{il}."
    w = {
        a: ops.make_linear(backend, *(t[b + n + ".weight"] for n in ps))
        for a, ps in linears.items()
    }
    w |= {a: t[b + n + ".weight"].dequantize() for a, n in norms.items()}
    return SimpleNamespace(**w)


def rope_key(rope: tuple) -> tuple:
    """A block's RoPE table (n_rot, base, freq_scale, factors or None) as a dict key: the
    factors by identity (a tensor compares elementwise)."""
    return (*rope[:3], id(rope[3]))


def rope_rows(rope: tuple, pos: torch.Tensor, memo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of a block's RoPE table (n_rot, base, freq_scale, factors or None) at `pos`,
    computed once per batch and table."""
    key = rope_key(rope)
    rows = memo.get(key)
    if rows is None:
        rows = memo[key] = rope_cache(pos, *rope)
    return rows


ROW_SCRATCH_MAX = 8  # rows a bound step serves: decode (1), MTP verify batches and trees (2-8)


def row_scratch(store: dict, x: torch.Tensor, lins: tuple, make):
    """A block's state for a step of M <= ROW_SCRATCH_MAX rows (decode, an MTP verify batch) on
    the native CPU path, or None (another path, or more rows: those allocate per call). Built by
    `make(M)` once per thread and M (and again if one of `lins` was replaced) and kept in
    `store`: the block's temporaries (its q/k/v projection with the head views
    attention reads, the gate/up rows), written in place each step, and its kernel calls bound
    to them (ops.linear_site, ops.rope_site). Values are unchanged (the same kernels, another
    destination), so batch invariance holds. `lins`: every linear the bound calls use; all must
    be plain native linears (a tensor-parallel one, core/distributed/layers.py, gathers across
    ranks)."""
    m = x.shape[0]
    if m > ROW_SCRATCH_MAX or x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
        return None
    key = (get_ident(), m)
    s = store.get(key)
    if s is None or s[0] != lins:  # linears compare by identity: a replaced one rebuilds
        if any(type(w) is not cpu_native.NativeLinear for w in lins):
            s = store[key] = (lins, None)
        else:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, reusable anywhere
                s = store[key] = (lins, make(m))
    return s[1]


class StepBlock:
    """A pre-norm attention + GLU block (llama, Gemma 3) whose few-row steps on the native CPU
    path keep bound state (`row_scratch` over its four linears `w.wqkv`, `w.wo`,
    `w.w_gate_up`, `w.w_down`); its `_scratch(m)` puts the whole-block native call last."""

    def step_state(self, x: torch.Tensor):
        w = self.w
        return row_scratch(self._rows, x, (w.wqkv, w.wo, w.w_gate_up, w.w_down), self._scratch)

    def native_site(self, x: torch.Tensor):
        """The whole block as one native call for a step of x's rows (ops.block_site), or
        None off that path."""
        s = self.step_state(x)
        return s[-1] if s is not None else None


class DecoderLM:
    """The forward pass every architecture shares. A subclass implements `load_block(il)` and
    calls `build` from its __init__."""

    supports_cuda_graphs: ClassVar[bool] = True

    def build(self, c, tensors, backend: Backend, embed: Embedding) -> None:
        """The trunk: blocks 0 .. n_layer - 1, output norm and head (the NextN heads, when
        loaded, are set by the subclass: `self.mtp = NextNHeads(self)`)."""
        self.config, self.tensors, self.backend, self.embed = c, tensors, backend, embed
        self._stacks: dict = {}  # (thread, rows, depth) -> DecoderLM._stack's bound state
        self.blocks = [self.load_block(il) for il in range(c.n_layer)]
        self.output_norm = tensors["output_norm.weight"].dequantize()
        self.output = lm_head(backend, tensors)

    def load_block(self, il: int):
        """The architecture's decoder block il (trunk layer or NextN block body)."""
        raise NotImplementedError(f"{type(self).__module__} defines no load_block")

    def kv_layout(self) -> dict:
        return {il: self.config.layer_kv(il) for il in range(self.config.n_layer)}

    def forward(
        self, tokens: torch.Tensor, cache, logits: Rows = "last", n_layer: int | None = None
    ) -> ForwardOutput:
        """tokens [T] -> logits [n, V] fp32 for the requested rows, and the pre-norm hidden state
        of every row [T, H]; `n_layer`: run only the first n_layer blocks (early exit)."""
        tokens = token_ids(tokens)
        pos = cache.positions(tokens.numel())
        cache.begin(pos)
        memo: dict = {}
        x = self.embed(tokens)  # [T, H]
        blocks = self.blocks[:n_layer]
        stack = self._stack(x, blocks, cache)
        if stack is not None:  # few rows on the native path: every block in one native call
            site, ropes, args = stack
            x = site(x, [rope_rows(r, pos, memo) for r in ropes], *args)
        else:
            for blk in blocks:
                x = blk(x, rope_rows(blk.rope, pos, memo), cache)
        out = None if logits is None else self.lm_logits(select_rows(x, logits))
        return ForwardOutput(out, x)

    def _stack(self, x: torch.Tensor, blocks: list, cache):
        """(ops.stack_site over `blocks`, their distinct RoPE tables, the cache's
        native_stack arguments) for a step of x's rows, or None: more rows than
        ROW_SCRATCH_MAX, a block without a native site, or a cache without native_stack. Built
        once per thread, row count and depth (the blocks' linears are bound then, as in
        row_scratch)."""
        m = x.shape[0]
        if m > ROW_SCRATCH_MAX or not blocks:
            return None
        key = (get_ident(), m, len(blocks))
        st = self._stacks.get(key)
        if st is None:
            tables: dict = {}  # rope_key -> (index, the block's rope)
            for blk in blocks:
                tables.setdefault(rope_key(blk.rope), (len(tables), blk.rope))
            index = [tables[rope_key(b.rope)][0] for b in blocks]
            site = ops.stack_site([blk.native_site(x) for blk in blocks], index)
            layers = tuple(blk.il for blk in blocks)
            st = self._stacks[key] = (site, [r for _, r in tables.values()], layers)
        site, ropes, layers = st
        if site is None:
            return None
        args = cache.native_stack(layers)
        return None if args is None else (site, ropes, args)

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden rows x [n, H] -> logits [n, V] fp32 (output norm and LM head)."""
        return head_logits(self.config, self.output, self.output_norm, x)
