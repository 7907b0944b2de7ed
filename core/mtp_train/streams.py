"""Draft-step streams: the NextN forward of D draft positions at once, exactly as the MTP context runs
them at inference, plus the self-distillation loss.

Stream d (draft position d, 1-based) at position q: token x_q with hidden H_{d-1}(q-1), where H_0 is
the trunk's pre-norm hidden and H_i the output of stream i; it predicts x_{q+1}, and its teacher is
the trunk's distribution at q. Attention follows the MTP cache at inference: a draft round that
started at r = q-d+1 sees the teacher-forced (stream 1) rows at positions <= r, then the round's own
draft rows: stream i's row at r+i-1 for i = 2..d. One block reused (K = 1) computes every stream's
K/V once; chained blocks (K > 1, stream d uses block d-1) recompute the earlier streams' K/V with
their own weights, as the NextN drafter re-decodes the draft prefix per block (core/decode/drafter.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from llmkit.core.models.nextn import nextn_input
from llmkit.kernels.ops import rms_norm
from llmkit.kernels.rope import rope_cache


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64 (right-padded)
    valid: torch.Tensor  # [B, T] bool: rows scored (not padding, not an evaluation prompt)
    hidden: torch.Tensor  # [B, T, H] fp32 trunk pre-norm hidden
    top_ids: torch.Tensor  # [B, T, k] int64 teacher top-k token ids
    top_logits: torch.Tensor  # [B, T, k] fp32
    lse: torch.Tensor  # [B, T] fp32 teacher logsumexp over the full vocabulary

    def to(self, device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def _shift(h: torch.Tensor) -> torch.Tensor:
    """H(q-1) at q (zeros at position 0, as the drafter pairs the first row)."""
    return torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), 1)


def _stream_mask(T: int, d: int, window: int | None, device) -> torch.Tensor:
    """[T, d*T] visibility of [stream 1 keys | stream 2 keys | ... | stream d keys] for stream d."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    parts = [k <= q - d + 1] + [k == q - d + i for i in range(2, d + 1)]
    if window:
        parts = [p & (q - k < window) for p in parts]
    return torch.cat(parts, 1)


class FnAttention:
    """A block's `att` argument over an attention function (q, k, v, scale) -> o."""

    def __init__(self, fn):
        self.fn = fn

    def attend(self, il: int, q, k, v, scale: float) -> torch.Tensor:
        return self.fn(q, k, v, scale)

    def native_step(self, il: int) -> None:
        return None  # the attention is the function


def stream_forward(make_block, c, blocks, embed: torch.Tensor, b: Batch, depth: int, n_main: int):
    """Outputs H_1..H_depth, each [B, T, H] (pre-norm). `make_block(il, weights)` is the model's
    own Block over the trainable weights (`lm.model.block`); `embed` [B, T, H] = trunk
    embeddings."""
    B, T, H = b.hidden.shape
    pos = torch.arange(T)
    kvs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    outs = [b.hidden]  # outs[i] = H_i
    for d in range(1, depth + 1):
        j = 0 if len(blocks) == 1 else d - 1
        w, il = blocks[j], n_main + j
        blk = make_block(il, w)
        cos, sin = (t.to(b.hidden.device) for t in rope_cache(pos, *blk.rope))
        rope = (cos.repeat(B, 1), sin.repeat(B, 1))

        def x_in(i, w=w):  # the block's input rows for stream i
            x = nextn_input(c, w.eh_proj, w.enorm, w.hnorm, embed, _shift(outs[i - 1]))
            return x.reshape(B * T, H)

        for i in range(1, d):
            if (j, i) not in kvs:
                _, k, v, _ = blk.qkv(x_in(i), rope)
                kvs[(j, i)] = (k.view(B, T, *k.shape[1:]), v.view(B, T, *v.shape[1:]))
        mask = _stream_mask(T, d, c.layer_kv(il).window, b.hidden.device)

        def attend(q, k, v, scale, j=j, d=d, mask=mask):
            kvs[(j, d)] = (k.view(B, T, *k.shape[1:]), v.view(B, T, *v.shape[1:]))
            K = torch.cat([kvs[(j, i)][0] for i in range(1, d + 1)], 1)  # [B, d*T, Hkv, D]
            V = torch.cat([kvs[(j, i)][1] for i in range(1, d + 1)], 1)
            o = F.scaled_dot_product_attention(
                q.view(B, T, *q.shape[1:]).transpose(1, 2),
                K.transpose(1, 2),
                V.transpose(1, 2),
                attn_mask=mask[None, None],
                scale=scale,
                enable_gqa=q.shape[1] != K.shape[2],
            )
            return o.transpose(1, 2).reshape(B * T, -1)

        outs.append(blk(x_in(d), rope, FnAttention(attend)).view(B, T, H))
    return outs[1:]


def student_logits(c, norm: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Head logits of hidden rows h [N, H] over the head rows w [u, H] (all or a candidate set)."""
    z = rms_norm(h, norm, c.eps) @ w.T
    return torch.tanh(z / c.softcap) * c.softcap if c.softcap > 0 else z


def distill_loss(c, norm, head_w: torch.Tensor, h: torch.Tensor, b: Batch, rows: torch.Tensor):
    """KL(teacher || student) on the coarsened distribution {teacher top-k tokens, everything else}
    (by the data-processing inequality a lower bound of the full-vocabulary KL), for rows `rows`
    [B, T] bool. The student's softmax runs over U = the union of the batch's teacher top-k ids
    rather than all V tokens (the head is 49k-262k rows: the cost that dominates training): every
    token any row's teacher finds plausible competes in every row. Returns (mean loss, top-1
    agreement within U)."""
    ids, tl, lse = b.top_ids[rows], b.top_logits[rows], b.lse[rows]  # [N, k], [N, k], [N]
    U, inv = torch.unique(ids, return_inverse=True)  # inv [N, k] -> column in U
    z = student_logits(c, norm, head_w[U], h[rows])  # [N, u]
    logz = torch.logsumexp(z, -1, keepdim=True)
    log_q = z.gather(1, inv) - logz
    log_p = tl - lse[:, None]
    p = log_p.exp()
    tail = (1 - p.sum(-1)).clamp_min(1e-6)
    z_rest = z.scatter(1, inv, float("-inf"))
    log_q_tail = (torch.logsumexp(z_rest, -1) - logz[:, 0]).clamp_min(-30.0)
    kl = (p * (log_p - log_q)).sum(-1) + tail * (tail.log() - log_q_tail)
    agree = (U[z.argmax(-1)] == ids[:, 0]).float().mean()
    return kl.mean(), agree


def hidden_loss(norm: torch.Tensor, eps: float, h: torch.Tensor, b: Batch, rows: torch.Tensor):
    """Relative squared error between the student's and the trunk's hidden state as the LM head
    sees them (RMS-normalised, times the trunk's output norm `norm`), for rows [B, T] bool. The
    NextN output stands in for the trunk's hidden at the same position (EAGLE's feature
    regression): a dense target per row on top of the top-k distribution, and the input the
    reused block gets back at the next draft position."""
    u_s = rms_norm(h[rows], norm, eps)  # [N, H]
    u_t = rms_norm(b.hidden[rows], norm, eps)
    return ((u_s - u_t).pow(2).sum(-1) / u_t.pow(2).sum(-1).clamp_min(1e-6)).mean()


def loss_rows(b: Batch, d: int) -> torch.Tensor:
    """Rows that train draft position d: valid, and the round they belong to started at q-d+1 >= 1
    (position 0 has no trunk hidden before it)."""
    T = b.tokens.shape[1]
    ok = torch.arange(T, device=b.tokens.device) >= d
    return b.valid & ok[None, :]
