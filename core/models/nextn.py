"""NextN (MTP) draft heads, one implementation for every architecture: the architecture's own
decoder Block plus the input projection and the shared head (DeepSeek / Step3.5's contract, which
llama.cpp follows; llmkit also trains such heads for llama and gemma3, core/mtp_train).

GGUF layout: `{arch}.block_count` = trunk layers + K NextN blocks, `{arch}.nextn_predict_layers` =
K; block il = n_layer + j carries the architecture's ordinary block tensors plus
`blk.il.nextn.{eh_proj, enorm, hnorm}` and optionally `shared_head_norm`, `shared_head_head` and
`embed_tokens` (else the trunk's output norm, head and embedding).

Dataflow: x0 = eh_proj [rms(embd[tok], enorm) | rms(h_prev, hnorm)] (embedding first); one decoder
block il; h_out = its output before any norm (it seeds the next draft step); logits =
head(rms(h_out, shared_head_norm)), soft-capped like the trunk's. The trunk hidden fed in is the
residual after the last trunk layer, before output_norm. A NextN block's cache geometry is the
architecture's layer il (Gemma 3's block 18 + j continues the 5-local/1-global pattern: a sliding
window, so its cache is a ring like the trunk's local layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from threading import get_ident

import torch

from llmkit.core.model.protocol import Cache, ForwardOutput, Rows
from llmkit.core.models.common import Embedding, head_logits, select_rows, softcap
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.kernels.rope import rope_cache
from llmkit.quant.tensor import QTensor

NEXTN_NORMS = ("enorm", "hnorm", "shared_head_norm")


def nextn_input(c, eh_proj, enorm, hnorm, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x0 = eh_proj [rms(e, enorm) | rms(h, hnorm)] (embedding first, as Step3.5/DeepSeek)."""
    return eh_proj(ops.rms_norm_cat(((e, enorm), (h, hnorm)), c.eps))


@dataclass
class NextNHead:
    block: object  # the architecture's Block at index il
    eh_proj: object
    enorm: torch.Tensor
    hnorm: torch.Tensor
    head_norm: torch.Tensor
    head: object  # linear over the head rows
    head_weight: QTensor  # the head's GGUF tensor (a draft vocabulary selects rows of it)
    embed: Embedding
    draft_head: object | None = None  # head restricted to the draft vocabulary
    sites: dict = field(default_factory=dict)  # (thread, rows) -> its draft_step native call


class NextNHeads:
    """The DraftHeads of a model (core/model/protocol.py) built from its NextN blocks."""

    def __init__(self, model):
        """`model.load_block(il)` builds the architecture's Block for layer il."""
        c, t, backend = model.config, model.tensors, model.backend
        if c.n_nextn == 0:
            raise LlmkitError("this model declares no NextN (MTP) blocks")
        self.config, self.backend = c, backend
        self.heads = []
        for il in range(c.n_layer, c.n_layer_all):
            b = f"blk.{il}.nextn."
            norm, head, emb = (t.get(b + n) for n in ("shared_head_norm.weight",
                               "shared_head_head.weight", "embed_tokens.weight"))  # fmt: skip
            trunk_head = t.get("output.weight") or t["token_embd.weight"]
            self.heads.append(
                NextNHead(
                    model.load_block(il),
                    ops.make_linear(backend, t[b + "eh_proj.weight"]),
                    t[b + "enorm.weight"].dequantize(),
                    t[b + "hnorm.weight"].dequantize(),
                    norm.dequantize() if norm is not None else model.output_norm,
                    ops.make_linear(backend, head) if head is not None else model.output,
                    head if head is not None else trunk_head,
                    Embedding(emb, model.embed.scale) if emb is not None else model.embed,
                )
            )
        self.n_heads, self.n_vocab = len(self.heads), self.config.n_vocab
        self.draft_vocab: torch.Tensor | None = None  # [n] int64 shortlist (None: all tokens)

    def kv_layout(self) -> dict:
        return {h.block.il: self.config.layer_kv(h.block.il) for h in self.heads}

    def set_draft_vocab(self, ids) -> None:
        """Draft over a token shortlist (`ids`, e.g. the trained head's most frequent teacher
        argmaxes; None: the full vocabulary). The draft head then multiplies only those rows of
        the head matrix (Gemma 3: 16k of 262k) and every other token gets -inf. Verification
        keeps the full head, so greedy output stays lossless; a draft outside the list is just
        never proposed."""
        if ids is None:
            self.draft_vocab = None
            return
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        for n in self.heads:
            w = n.head_weight
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]:
                raise LlmkitError(f"draft vocabulary ids must lie in [0, {w.shape[0]})")
            raw = ops.gather_rows(w, ids)
            sub = QTensor(w.name + "[draft_vocab]", w.qtype, (ids.numel(), *w.shape[1:]), raw)
            n.draft_head = ops.make_linear(self.backend, sub)
        self.draft_vocab = ids.to(self.backend.device)

    def forward(
        self, head: int, tokens: torch.Tensor, h: torch.Tensor, cache: Cache, logits: Rows = "last"
    ) -> ForwardOutput:
        """NextN block `head` on rows (token at p, trunk or draft hidden of p - 1) -> logits for
        the requested rows and h_out [T, H] pre-norm. `cache` holds layer n_layer + head;
        logits=None skips the head (mirroring only fills the block's KV)."""
        n, rope = self._begin(head, tokens, h, cache)
        x = self._block(n, tokens, h, rope, cache)
        if logits is None:
            return ForwardOutput(None, x)
        z, ids = self.draft_logits(head, select_rows(x, logits))
        if ids is None:
            return ForwardOutput(z, x)
        full = z.new_full((z.shape[0], self.config.n_vocab), float("-inf"))
        full[:, ids] = z
        return ForwardOutput(full, x)

    def draft_step(self, head: int, tokens: torch.Tensor, h: torch.Tensor, cache: Cache,
                   rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """A draft pass: forward(head, tokens, h, cache, logits=None).hidden and the
        draft_logits of its rows `rows`, as (h_out [T, H], z, ids). On the native CPU path one
        call (ops.nextn_site) makes the same kernel calls on the same values: the same bits,
        without the interpreter between them."""
        n, rope = self._begin(head, tokens, h, cache)
        site = self._site(n, h)
        step = cache.native_step(n.block.il) if site is not None else None
        if step is None:
            x = self._block(n, tokens, h, rope, cache)
            return (x, *self.draft_logits(head, x[rows]))
        if tokens.dtype != torch.long or not tokens.is_contiguous():
            tokens = tokens.long().contiguous()
        y, z = site(tokens, h, torch.tensor(rows, dtype=torch.long), *rope, *step)
        return y, softcap(self.config, z), self.draft_vocab

    def _begin(self, head: int, tokens: torch.Tensor, h: torch.Tensor, cache: Cache) -> tuple:
        """Checks, then this pass's positions reserved in `cache`: (the head, its RoPE rows)."""
        if not 0 <= head < self.n_heads:
            raise LlmkitError(f"MTP head {head} is not loaded ({self.n_heads} heads)")
        c, n = self.config, self.heads[head]
        T = tokens.numel()
        if tuple(h.shape) != (T, c.n_embd):
            raise LlmkitError(f"MTP hidden must be [{T}, {c.n_embd}], got {list(h.shape)}")
        pos = cache.positions(T)
        cache.begin(pos)
        return n, rope_cache(pos, *n.block.rope)

    def _block(self, n: NextNHead, tokens, h, rope, cache) -> torch.Tensor:
        """The head's input projection and block, op by op."""
        x0 = nextn_input(self.config, n.eh_proj, n.enorm, n.hnorm, n.embed(tokens), h.float())
        return n.block(x0, rope, cache)

    def _site(self, n: NextNHead, h: torch.Tensor):
        """Head n's draft pass for h's rows as one native call (ops.nextn_site), or None: built
        once per thread and row count, and again when the draft head changes."""
        if (
            h.dtype != torch.float32
            or not h.is_contiguous()
            or h.requires_grad
            or type(n.embed) is not Embedding  # e.g. a tensor-parallel one (core/distributed)
        ):
            return None
        block = n.block.native_site(h)  # the block's own bound call for these rows
        if block is None:  # off the native path, or more rows than a bound step serves
            return None
        head = n.draft_head if self.draft_vocab is not None else n.head
        key = (get_ident(), h.shape[0])
        s = n.sites.get(key)
        if s is None or s[0] is not block or s[1] is not head:
            site = ops.nextn_site(block, n.embed.lookup, (n.enorm, n.hnorm), self.config.eps,
                                  n.eh_proj, head, n.head_norm)  # fmt: skip
            s = n.sites[key] = (block, head, site)
        return s[2]

    def draft_logits(self, head: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of head `head` for its output rows x [n, H] over the draft vocabulary: (z [n,
        len(ids)], ids), or (z [n, n_vocab], None) without a shortlist. What the drafter reads:
        no scatter into a full-vocabulary row (Gemma 3: 262k values) per draft step."""
        n = self.heads[head]
        if self.draft_vocab is None:
            return head_logits(self.config, n.head, n.head_norm, x), None
        return head_logits(self.config, n.draft_head, n.head_norm, x), self.draft_vocab
