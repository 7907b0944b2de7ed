"""Gemma 4 MTP assistant (`gemma4-assistant`): a small Gemma 4 decoder that drafts for a `gemma4`
target by attending with Q only over the target's KV cache (it has no K/V projections and never
writes KV), as llama.cpp's gemma4-assistant graph and transformers' Gemma4AssistantForCausalLM.

Row (token t, target hidden h, the target's post-final-norm state of the row that produced t):
z = pre_projection([target_embd[t] * sqrt(H_target), h]); per block the Gemma 4 block with its
attention over the target cache of the last KV-owning target layer of the same type (sliding:
the sliding mask, as if the query sat at position n_past), scale 1.0; y = rms(z; output_norm);
logits = y . token_embd^T (the assistant's tied head, no softcap); h_next = post_projection(y),
the hidden fed to the next draft step, which runs at the same position n_past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.core.cache.kv import KVCache
from llmkit.core.cache.store import load
from llmkit.core.model.config import MAX_DIM, gguf
from llmkit.core.model.device import OnDevice, tensors_to
from llmkit.core.model.weights import TensorSpec
from llmkit.core.models import gemma4
from llmkit.core.models.common import lm_head, rope_rows
from llmkit.core.models.loader import read_model_file
from llmkit.errors import LlmkitError
from llmkit.kernels import ops


@dataclass(kw_only=True)
class Config(gemma4.Config):
    # every block is a drafter block: nextn_predict_layers (= block_count) is not a trunk split
    n_nextn: int = 0
    n_embd_out: int = gguf("embedding_length_out", at_least=1, at_most=MAX_DIM)

    checks_owners = False  # no layer owns KV: all of them read the target's caches

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd_pl or self.n_expert:
            raise LlmkitError("gemma4-assistant: per-layer embeddings and experts are not expected")
        if self.n_kv_shared != self.n_layer:
            raise LlmkitError(
                f"gemma4-assistant: shared_kv_layers is {self.n_kv_shared}, must equal the "
                f"block count {self.n_layer} (the assistant computes no K/V)"
            )


def tensor_specs(c: Config, part: str = "trunk", names=()) -> list[TensorSpec]:
    if part != "trunk":
        raise LlmkitError("gemma4-assistant has no NextN blocks")
    H, V, Ho = c.n_embd, c.n_vocab, c.n_embd_out
    specs = [
        TensorSpec("token_embd.weight", (V, H)),
        TensorSpec("output_norm.weight", (H,)),
        TensorSpec("output.weight", (V, H), optional=True),
        TensorSpec("rope_freqs.weight", (c.head_dim // 2,), optional=True),
        TensorSpec("nextn.pre_projection.weight", (H, 2 * Ho)),
        TensorSpec("nextn.post_projection.weight", (Ho, H)),
    ]
    return specs + [s for il in range(c.n_layer) for s in gemma4.block_names(c, il)]


class Model:
    def __init__(self, c, tensors, backend, mtp: bool = False):
        raise LlmkitError(
            "a gemma4-assistant GGUF is a drafter: run its gemma4 model with "
            "-md <assistant.gguf> --mtp"
        )


def attend_readonly(cache, il: int, q: torch.Tensor, pos: int, window: int | None):
    """q [T, Hq, D] at position `pos` over layer il's cached positions < pos (the last
    `window` - 1 of them for a sliding layer), nothing written: [T, Hq * D]."""
    if not isinstance(cache, KVCache):
        raise LlmkitError("the gemma4 assistant drafts over a single-sequence KV cache only")
    g = cache.group_of[il]
    n = min(g.capacity, pos)  # slot = position (mod a ring's capacity): positions < pos
    K, V = load(g.k[il], cache.type_k, n), load(g.v[il], cache.type_v, n)
    kp = g.slot_pos[:n]
    vis = (kp >= 0) & (kp < pos)
    if window is not None:
        vis &= (pos - kp) < window
    return ops.attention_torch(q, K.float(), V.float(), vis[None].expand(q.shape[0], n), 1.0)


def _target_config(target) -> gemma4.Config:
    tc = getattr(target, "config", None)
    if not isinstance(tc, gemma4.Config) or isinstance(tc, Config):
        raise LlmkitError("a gemma4-assistant drafts for a gemma4 model only")
    return tc


class Assistant:
    """The assistant's weights bound to its target (a loaded `gemma4` model)."""

    def __init__(self, c: Config, tensors: dict, target):
        tc = _target_config(target)
        if c.n_embd_out != tc.n_embd:
            raise LlmkitError(
                f"assistant expects a target width of {c.n_embd_out}, the model has {tc.n_embd}"
            )
        if c.n_vocab != tc.n_vocab:
            raise LlmkitError(f"assistant vocabulary {c.n_vocab} != the model's {tc.n_vocab}")
        self.config, self.target, backend = c, target, target.backend
        factors = (
            tensors["rope_freqs.weight"].dequantize() if "rope_freqs.weight" in tensors else None
        )
        self.blocks, self.src = [], []
        for il in range(c.n_layer):
            same = [j for j in range(tc.n_layer) if tc.swa[j] == c.swa[il]]
            kind = "sliding" if c.swa[il] else "full"
            if not same:
                raise LlmkitError(f"assistant {kind} layer {il}: the model has no {kind} layer")
            src = tc.kv_owner[same[-1]]  # resolved through the target's KV sharing
            if (c.hd(il), c.sliding_window if c.swa[il] else 0) != (
                tc.hd(src),
                tc.sliding_window if tc.swa[src] else 0,
            ) or c.n_head % tc.kv_heads[src]:
                raise LlmkitError(
                    f"assistant {kind} layer {il} does not fit the model's layer {src} "
                    "(head size, window or KV heads)"
                )
            w = gemma4.load_weights(tensors, il, backend)
            self.blocks.append(gemma4.Block(c, il, w, factors))
            self.src.append(src)
        self.pre = ops.make_linear(backend, tensors["nextn.pre_projection.weight"])
        self.post = ops.make_linear(backend, tensors["nextn.post_projection.weight"])
        self.head = lm_head(backend, tensors)
        self.output_norm = tensors["output_norm.weight"].dequantize()
        self.device = backend.device

    def target_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The target's pre-norm hidden rows -> the post-final-norm rows the assistant reads."""
        h = h.to(self.device).contiguous()
        return ops.rms_norm(h, self.target.output_norm, self.target.config.eps)

    def step(self, tokens: torch.Tensor, h: torch.Tensor, pos: int, cache):
        """One draft step for rows (tokens [T], target-width hidden h [T, Ho]) at position `pos`
        over the target `cache`: (logits [T, V] fp32 on the CPU, h_next [T, Ho])."""
        p = torch.full((tokens.numel(),), pos, dtype=torch.long)
        return self.rows(tokens, h, p, lambda il, q, w: attend_readonly(cache, il, q, pos, w))

    def rows(self, tokens: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, attend):
        """One draft step for rows of possibly different sequences, row i at position pos[i]:
        attend(il, q [T, Hq, D], window) -> [T, Hq * D] reads, for each row, target layer il's
        KV of that row's own sequence. (logits [T, V] fp32 on the CPU, h_next [T, Ho])."""
        c = self.config
        tokens, h = tokens.to(self.device), h.to(self.device)
        x = self.target.embed(tokens)  # the target's table, scaled by sqrt(H_target)
        z = ops.linear(self.pre, torch.cat((x, h), dim=-1).contiguous())
        p = pos.to(device=z.device, dtype=torch.long)
        memo: dict = {}
        for blk, src in zip(self.blocks, self.src, strict=True):
            q, _ = blk.query(z, rope_rows(blk.rope, p, memo))
            z = blk.finish(z, attend(src, q, blk.window), None)
        y = ops.rms_norm(z, self.output_norm, c.eps)
        return self.head(y).float().cpu(), ops.linear(self.post, y)


def is_assistant(path) -> bool:
    from llmkit.core.gguf.reader import GGUFFile

    return GGUFFile(path).architecture == "gemma4-assistant"


def load_assistant(path, target) -> Assistant:
    """The assistant GGUF at `path`, checked, bound to the loaded target model `target`."""
    target = target.model if isinstance(target, OnDevice) else target  # its own tensors
    _target_config(target)
    mf = read_model_file(path)
    if mf.arch != "gemma4-assistant":
        raise LlmkitError(f"{path}: a {mf.arch} file, not a gemma4-assistant drafter")
    tensors = mf.tensors
    if target.backend.device.type != "cpu":
        tensors = tensors_to(tensors, target.backend.device)
    return Assistant(mf.config, tensors, target)
