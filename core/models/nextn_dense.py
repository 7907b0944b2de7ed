"""NextN (MTP) draft blocks for the dense architectures `llama` and `gemma3` (llmkit's extension:
llama.cpp has NextN only for Step3.5 / DeepSeek / GLM; the tensor naming and dataflow are theirs).

GGUF layout: `{arch}.block_count` = trunk layers + K NextN blocks, `{arch}.nextn_predict_layers` = K;
block il = n_main + j carries the model's ordinary layer tensors (`blk.il.attn_*`, `blk.il.ffn_*`,
gemma3's q/k and post norms) plus `blk.il.nextn.{eh_proj,enorm,hnorm,shared_head_norm}`.
Dataflow (Step3.5's contract): x0 = eh_proj [rms(embd[tok], enorm) | rms(h_prev, hnorm)]; one decoder
block of the model's own kind at index il; h_out = its output before any norm (it seeds the next
draft step); logits = head(rms(h_out, shared_head_norm)) with the trunk's head (tied embedding or
`output.weight`; gemma3's final soft-cap when the model declares one). The trunk hidden fed in is the
residual after the last trunk layer, before output_norm (`mtp_hidden = "pre_norm"`).

Gemma 3: the NextN block is a *sliding-window* layer (window = the model's sliding_window, local rope
base 10000): block index n_main + j = 18 + j continues the 5-local/1-global pattern (18 % 6 = 0 is
local), and a draft needs only recent context. `mtp_kv_layout` declares the window, so its cache is a
ring like the trunk's local layers. Training (core/mtp_train) uses the same block function.

The block math lives here once (`block_forward`), parameterised by an attention callback, so the
inference head (KV cache), llmkit's trainer (autograd, multi-stream masks) and batched generation run
exactly the same operations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.core.cache.kv import KVCache, LayerKV
from llmkit.core.layers import (
    ROPE_NEOX,
    ROPE_NORM,
    apply_rope,
    gelu_tanh,
    rms_norm,
    rope_cache,
    silu,
)
from llmkit.core.model.weights import TensorSpec
from llmkit.core.models.common import begin_mtp_batch, select_rows
from llmkit.errors import LlmkitError
from llmkit.kernels.dispatch import make_linear
from llmkit.quant.tensor import QTensor

KINDS = ("llama", "gemma3")
NEXTN_NORMS = ("enorm", "hnorm", "shared_head_norm")
# attend(q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv], scale) -> o [N, Hq * Dv]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def split_layers(c, kind: str) -> None:
    """Config hook: block_count counts trunk + NextN blocks; keep `n_layer` = trunk layers (what the
    trunk code loops over) and remember the total in `n_layer_all`."""
    if not 0 <= c.n_nextn < c.n_layer:
        raise LlmkitError(
            f"{kind}: nextn_predict_layers {c.n_nextn} must be below block_count {c.n_layer}"
        )
    c.n_layer_all = c.n_layer
    c.n_layer -= c.n_nextn


def layer_specs(trunk_specs, c, il: int) -> list[TensorSpec]:
    """The ordinary tensors of block `il`, taken from the architecture's own trunk contract
    (`trunk_specs(cfg)` is its tensor_specs)."""
    cc = copy.copy(c)
    cc.n_layer = il + 1
    prefix = f"blk.{il}."
    return [s for s in trunk_specs(cc) if s.name.startswith(prefix)]


def nextn_specs(trunk_specs, c) -> list[TensorSpec]:
    """Embedding/head (shared with the trunk, optional in a sidecar) and every NextN block."""
    H, V = c.n_embd, c.n_vocab
    specs = [
        TensorSpec("token_embd.weight", (V, H), optional=True),
        TensorSpec("output_norm.weight", (H,), optional=True),
        TensorSpec("output.weight", (V, H), optional=True),
    ]
    for il in range(c.n_layer, c.n_layer_all):
        specs += layer_specs(trunk_specs, c, il)
        b = f"blk.{il}.nextn."
        specs += [
            TensorSpec(b + "eh_proj.weight", (H, 2 * H)),
            TensorSpec(b + "enorm.weight", (H,)),
            TensorSpec(b + "hnorm.weight", (H,)),
            TensorSpec(b + "shared_head_norm.weight", (H,)),
        ]
    return specs


def ignore_prefixes(c, part: str) -> tuple[str, ...]:
    """`blk.N.` prefixes outside `part` ("trunk" or "mtp"), for load_tensors(ignore_prefixes=...)."""
    if part not in ("trunk", "mtp"):
        raise ValueError(f"part must be trunk or mtp, not {part!r}")
    mine = range(c.n_layer) if part == "trunk" else range(c.n_layer, c.n_layer_all)
    return tuple(f"blk.{il}." for il in range(c.n_layer_all) if il not in mine)


def block_rope(kind: str, c, il: int, pos: torch.Tensor, factors=None):
    """cos/sin for block `il` at positions `pos` (any 1-D tensor)."""
    if kind == "llama":
        return rope_cache(pos, c.n_rot, c.rope_base, c.freq_scale, factors)
    if c.is_swa(il):
        return rope_cache(pos, c.head_dim, c.rope_base_swa, 1.0)
    return rope_cache(pos, c.head_dim, c.rope_base, c.freq_scale)


def block_qkv(kind: str, c, L, x: torch.Tensor, rope):
    """The attention inputs of one block on rows x [N, H]: (q, k, v, scale) with q/k roped."""
    N = x.shape[0]
    cos, sin = rope
    nq, nkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    a = rms_norm(x, L.attn_norm, c.eps)
    if kind == "llama":
        qkv = L.wqkv(a)
        qk = apply_rope(qkv[:, : nq + nkv].view(N, -1, c.head_dim), cos, sin, ROPE_NORM)
        v = qkv[:, nq + nkv :].view(N, c.n_head_kv, c.head_dim)
        return qk[:, : c.n_head], qk[:, c.n_head :], v, c.scale
    q, k, v = L.wqkv(a).split((nq, nkv, c.n_head_kv * c.head_dim_v), dim=-1)
    q = rms_norm(q.view(N, c.n_head, c.head_dim), L.q_norm, c.eps)
    k = rms_norm(k.view(N, c.n_head_kv, c.head_dim), L.k_norm, c.eps)
    q = apply_rope(q, cos, sin, ROPE_NEOX) * c.q_scale
    k = apply_rope(k, cos, sin, ROPE_NEOX)
    return q, k, v.view(N, c.n_head_kv, c.head_dim_v), 1.0


def block_rest(kind: str, c, L, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of the block after attention (o [N, Hq * Dv]): output projection, FFN, residuals."""
    if kind == "llama":
        x = x + L.wo(o)
        gate, up = L.w_gate_up(rms_norm(x, L.ffn_norm, c.eps)).chunk(2, dim=-1)
        return x + L.w_down(silu(gate) * up)
    x = x + rms_norm(L.wo(o), L.post_attn_norm, c.eps)
    gate, up = L.w_gate_up(rms_norm(x, L.ffn_norm, c.eps)).chunk(2, dim=-1)
    return x + rms_norm(L.w_down(gelu_tanh(gate) * up), L.post_ffw_norm, c.eps)


def block_forward(kind: str, c, L, x: torch.Tensor, rope, attend: Attend) -> torch.Tensor:
    """One decoder block of the model's own kind on rows x [N, H] (the trunk's per-layer math).
    `L` holds the block's weights with the trunk Layer's attribute names (wqkv, wo, w_gate_up,
    w_down and norms); any callables work, so the trainer passes differentiable ones."""
    return block_rest(kind, c, L, x, attend(*block_qkv(kind, c, L, x, rope)))


def nextn_input(c, eh_proj, enorm, hnorm, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x0 = eh_proj [rms(e, enorm) | rms(h, hnorm)] (embedding first, as Step3.5/DeepSeek)."""
    return eh_proj(torch.cat((rms_norm(e, enorm, c.eps), rms_norm(h, hnorm, c.eps)), dim=-1))


def head_logits(c, head, norm, x: torch.Tensor) -> torch.Tensor:
    out = head(rms_norm(x, norm, c.eps))
    softcap = getattr(c, "softcap", 0.0)
    return torch.tanh(out / softcap) * softcap if softcap > 0 else out


@dataclass
class NextNHead:
    """A loaded NextN block: the trunk's Layer class on block il plus the nextn.* tensors."""

    il: int
    layer: object
    eh_proj: object
    enorm: torch.Tensor
    hnorm: torch.Tensor
    head_norm: torch.Tensor


def build_heads(model, layer_cls, mtp: bool) -> list[NextNHead]:
    """The NextN heads of a dense model (none without `mtp`); `layer_cls(c, tensors, il, backend)`
    is the architecture's trunk layer class, reused for the block body."""
    c, t, backend = model.config, model.tensors, model.backend
    if not mtp:
        return []
    if c.n_nextn == 0:
        raise LlmkitError("this model declares no NextN (MTP) blocks")
    heads = []
    for il in range(c.n_layer, c.n_layer_all):
        b = f"blk.{il}.nextn."
        heads.append(
            NextNHead(
                il,
                layer_cls(c, t, il, backend),
                make_linear(backend, t[b + "eh_proj.weight"]),
                *(t[b + n + ".weight"].dequantize() for n in NEXTN_NORMS),
            )
        )
    return heads


class DenseNextN:
    """Mixin for llama / gemma3 `Model`: the MTP hooks core/mtp.py and core/speculative.py use.
    The class sets `nextn_kind`; `__init__` sets `self.heads = build_heads(...)`."""

    mtp_hidden = "pre_norm"
    nextn_kind = "llama"
    heads: list[NextNHead]
    draft_vocab: torch.Tensor | None = None  # [n] int64 shortlist of draft tokens (None: all)
    draft_output = None  # the output head restricted to draft_vocab's rows

    def set_draft_vocab(self, ids) -> None:
        """Draft over a token shortlist (`ids`, e.g. the trained head's most frequent teacher
        argmaxes; None: the full vocabulary). The draft head then multiplies only those rows of
        the output matrix (Gemma 3: 16k of 262k) and every other token gets -inf. Verification
        keeps the full head, so greedy output stays lossless; a draft outside the list is just
        never proposed."""
        if ids is None:
            self.draft_vocab = self.draft_output = None
            return
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        w = self.tensors.get("output.weight") or self.tensors["token_embd.weight"]
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]:
            raise LlmkitError(f"draft vocabulary ids must lie in [0, {w.shape[0]})")
        raw = w.raw[ids.to(w.raw.device)]
        sub = QTensor(w.name + "[draft_vocab]", w.qtype, (ids.numel(), *w.shape[1:]), raw)
        self.draft_output = make_linear(self.backend, sub)
        self.draft_vocab = ids.to(self.backend.device)

    @property
    def n_mtp_heads(self) -> int:
        return len(self.heads)

    def mtp_kv_layout(self) -> dict[int, LayerKV]:
        return {h.il: nextn_layer_kv(self.nextn_kind, self.config, h.il) for h in self.heads}

    def mtp_forward(
        self, head: int, tokens: torch.Tensor, h: torch.Tensor, cache: KVCache, logits="last"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NextN block `head` on rows (token at p, trunk/draft hidden of p-1) -> (logits [n, V],
        h_out [n, H] pre-norm). `cache` holds layer n_main + head. logits=None skips the LM head
        (mirroring only fills the block's KV) and returns (None, h_out [T, H])."""
        pos = begin_mtp_batch(self, head, tokens, h, cache)
        c, n = self.config, self.heads[head]

        def attend(q, k, v, scale):
            K, V, mask = cache.update(n.il, k, v)
            return cache.attention(q, K, V, mask, scale)

        x0 = nextn_input(c, n.eh_proj, n.enorm, n.hnorm, self.embed(tokens), h.float())
        rope = block_rope(self.nextn_kind, c, n.il, pos, getattr(self, "rope_factors", None))
        x = block_forward(self.nextn_kind, c, n.layer, x0, rope, attend)
        if logits is None:
            return None, x
        x = select_rows(x, logits)
        if self.draft_output is None:
            return head_logits(c, self.output, n.head_norm, x), x
        z = head_logits(c, self.draft_output, n.head_norm, x)  # [n, len(draft_vocab)]
        full = z.new_full((z.shape[0], c.n_vocab), float("-inf"))
        full[:, self.draft_vocab] = z
        return full, x


def nextn_layer_kv(kind: str, c, il: int) -> LayerKV:
    if kind == "llama":
        return LayerKV(c.n_head_kv, c.head_dim, c.head_dim)
    window = c.sliding_window if c.is_swa(il) else None
    return LayerKV(c.n_head_kv, c.head_dim, c.head_dim_v, window)
