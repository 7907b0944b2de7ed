"""Batched generation on the frozen trunk: B prompts decoded together, so the base model can write
its own training text at several times the single-sequence decode speed, and every step's trunk
hidden state and logits (the teacher) are kept instead of being recomputed.

Prompts are left-padded to a common length; a row's position is its column minus its padding, and
padded keys are masked (sliding layers also by the window). Every layer runs the model's own Block
over [B * T] rows with a dense per-layer KV buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmkit.core.mtp_train.streams import FnAttention
from llmkit.errors import LlmkitError
from llmkit.kernels.rope import rope_cache


@dataclass
class Generated:
    """One generated sequence with its teacher data (rows = tokens that were fed to the trunk)."""

    tokens: torch.Tensor  # [T] int64
    hidden: torch.Tensor  # [T, H] fp32 pre-norm trunk hidden
    logits_topk: tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]  # ids [T, k], logits [T, k], lse [T]


def topk_teacher(logits: torch.Tensor, k: int):
    """(ids int32 [N, k], logits fp16 [N, k], logsumexp fp32 [N]) of teacher logits [N, V]."""
    vals, ids = logits.topk(k, dim=-1)
    return ids.int(), vals.half(), torch.logsumexp(logits, dim=-1)


class BatchedTrunk:
    def __init__(self, lm):
        if lm.arch not in ("llama", "gemma3"):
            raise LlmkitError(f"mtp-train: architecture {lm.arch} is not supported")
        self.lm, self.m, self.c = lm, lm.model, lm.config

    def _step(self, tokens, pos, valid_k, kv, logits_rows):
        """tokens/pos [B, T]; valid_k [B, S] bool key validity over all columns so far (S includes
        these T); kv: per-layer (k, v) buffers [B, s_max, Hkv, D] (None before the first step:
        allocated then; growing them by concatenation cost a copy of the whole KV per step).
        Returns (logits, hidden)."""
        B, T = tokens.shape
        c, m = self.c, self.m
        x = m.embed(tokens.reshape(-1))
        S = valid_k.shape[1]
        qcol = torch.arange(S - T, S)
        causal = torch.arange(S)[None, :] <= qcol[:, None]  # [T, S]
        mask = causal[None] & valid_k[:, None, :]  # [B, T, S]
        mask = mask | torch.eye(S, dtype=torch.bool)[S - T :][None]  # padded rows see themselves
        # a row's pad cancels in q - k: the column distance is the position distance
        dist = qcol[:, None] - torch.arange(S)[None, :]
        for il, blk in enumerate(m.blocks):
            window = c.layer_kv(il).window
            lmask = mask & (dist < window)[None] if window else mask
            rope = rope_cache(pos.reshape(-1), *blk.rope)

            def attend(q, k, v, scale, il=il, lmask=lmask):
                k, v = k.view(B, T, *k.shape[1:]), v.view(B, T, *v.shape[1:])
                if kv[il] is None:  # the whole generation's columns, written in place
                    kv[il] = (k.new_empty(B, self.s_max, *k.shape[2:]),
                              v.new_empty(B, self.s_max, *v.shape[2:]))  # fmt: skip
                kv[il][0][:, S - T : S], kv[il][1][:, S - T : S] = k, v
                k, v = kv[il][0][:, :S], kv[il][1][:, :S]
                o = F.scaled_dot_product_attention(
                    q.view(B, T, *q.shape[1:]).transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    attn_mask=lmask[:, None],
                    scale=scale,
                    enable_gqa=q.shape[1] != k.shape[2],
                )  # [B, Hq, T, Dv]
                return o.transpose(1, 2).reshape(B * T, -1)

            x = blk(x, rope, FnAttention(attend))
        h = x.view(B, T, -1)
        rows = h[:, -1:] if logits_rows == "last" else h
        out = m.lm_logits(rows.reshape(-1, h.shape[-1]))
        return out.view(B, rows.shape[1], -1), h

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        n_new: int,
        temps: list[float],
        gen: torch.Generator,
        is_eog,
        k_top: int,
    ) -> list[Generated]:
        """Decode n_new tokens after each prompt (temperature per prompt, 0 = greedy; stops a row
        at end-of-generation). Returns prompt + fed tokens with their hidden states and teacher."""
        B = len(prompts)
        P = max(len(p) for p in prompts)
        pad = torch.tensor([P - len(p) for p in prompts])
        toks = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prompts):
            toks[b, P - len(p) :] = torch.tensor(p)
        cols = torch.arange(P)[None].expand(B, P)
        valid = cols >= pad[:, None]
        pos = (cols - pad[:, None]).clamp_min(0)
        kv: list = [None] * len(self.m.blocks)
        self.s_max = P + n_new
        logits, h = self._step(toks, pos, valid, kv, "all")
        # teacher top-k per step: full [B, T, V] logits would be GBs for a 262k vocabulary
        rows_tok, rows_h, rows_valid = [toks], [h], [valid]
        rows_teacher = [topk_teacher(logits.reshape(B * P, -1), k_top)]
        alive = torch.ones(B, dtype=torch.bool)
        temp = torch.tensor(temps, dtype=torch.float32)
        nxt = self._pick(logits[:, -1], temp, gen)
        for step in range(n_new - 1):
            alive &= ~torch.tensor([bool(is_eog(int(t))) for t in nxt])
            if not alive.any():
                break
            valid = torch.cat((valid, alive[:, None]), 1)
            pos = pos[:, -1:] + 1
            logits, h = self._step(nxt[:, None], pos, valid, kv, "last")
            rows_tok.append(nxt[:, None])
            rows_h.append(h)
            rows_teacher.append(topk_teacher(logits[:, -1], k_top))
            rows_valid.append(alive[:, None].clone())
            nxt = self._pick(logits[:, -1], temp, gen)
            del step
        toks, hs, vd = torch.cat(rows_tok, 1), torch.cat(rows_h, 1), torch.cat(rows_valid, 1)
        ids, vals, lse = (
            torch.cat([t[i].view(B, -1, *t[i].shape[1:]) for t in rows_teacher], 1)
            for i in range(3)
        )  # [B, T, k], [B, T, k], [B, T]
        out = []
        for b in range(B):
            keep = vd[b]
            teacher = (ids[b][keep].clone(), vals[b][keep].clone(), lse[b][keep].clone())
            out.append(Generated(toks[b][keep].clone(), hs[b][keep].clone(), teacher))
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, temp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if not (temp > 0).any():  # all greedy: sampling a [B, V] softmax would cost ~10% of a step
            return greedy
        t = temp.clamp_min(1e-6)[:, None]
        probs = torch.softmax(logits / t, -1)
        sampled = torch.multinomial(probs, 1, generator=gen)[:, 0]
        return torch.where(temp > 0, sampled, greedy)
