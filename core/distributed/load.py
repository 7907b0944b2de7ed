"""Load one tensor-parallel rank's shard of a GGUF model (`load_model` for a rank).

The file is read and checked exactly as `load_model` does; the tensors are then cut
(core/distributed/shard.py) before the architecture's Model is built, so the Blocks are the
architecture's own over fewer heads and FFN rows, and the KV cache holds only this rank's KV
heads. The linears whose outputs every rank needs, the embedding and the LM head are then
swapped for their sharded forms (core/distributed/layers.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llmkit.core.distributed.group import Group
from llmkit.core.distributed.layers import GatherRows, ShardedExperts, SumColumns, VocabEmbedding
from llmkit.core.distributed.shard import ShardPlan, attn_in_sizes, plan_shard, spans
from llmkit.core.model.device import OnDevice, tensors_to
from llmkit.core.models.loader import LoadedModel, apply_draft_vocab, read_model_file
from llmkit.errors import LlmkitError
from llmkit.kernels.backend import Backend


def check_tp(path, tp: int, mode: str = "exact", mtp: bool = False, draft_path=None,
             moe_n_expert=None) -> None:  # fmt: skip
    """What rank 0 checks before it starts any other rank: the file and whether it splits."""
    from llmkit.core.distributed.shard import check_shardable

    mf = read_model_file(path, mtp, draft_path, moe_n_expert)
    check_shardable(mf.arch, mf.config, tp, mode)


def load_shard(group: Group, path: str | Path, device: str = "cpu", mtp: bool = False,
               draft_path=None, moe_n_expert=None, mode: str = "exact",
               kernels: str | None = None, repack: bool = True) -> LoadedModel:  # fmt: skip
    """This rank's LoadedModel: `tensors` holds only its parts (what `weights_bytes` counts)."""
    t0 = time.perf_counter()
    mf = read_model_file(path, mtp, draft_path, moe_n_expert)
    plan = plan_shard(mf.arch, mf.config, mf.tensors, group.world, group.rank, mode)
    if device not in ("cpu", "cuda"):
        raise LlmkitError(f"unknown device {device!r} (use cpu or cuda)")
    backend = Backend(
        group.device if device == "cuda" else torch.device("cpu"), kernels=kernels, repack=repack
    )
    tensors = plan.tensors
    if backend.device.type != "cpu":
        tensors = tensors_to(tensors, backend.device)
    model = mf.module.Model(plan.config, tensors, backend, mtp=mtp)
    wrap_model(model, plan, group, mf.tensors)
    if mtp:
        apply_draft_vocab(model, mf.gd or mf.gf)
    if backend.device.type != "cpu":
        model = OnDevice(model, backend.device)
    lm = LoadedModel(Path(path), mf.gf, mf.arch, mf.config, model, tensors, backend,
                     time.perf_counter() - t0)  # fmt: skip
    lm.tp_plan = plan
    return lm


def _holder(blk):
    """The object that carries a Block's linears (llama: `blk.w`; step35: the block itself)."""
    return blk.w if hasattr(blk, "w") and hasattr(blk.w, "wo") else blk


def _combine(lin, name: str, plan: ShardPlan, group: Group, in_sizes: list[int]):
    """The sharded form of a row-parallel linear (attn_output / ffn_down)."""
    if name in plan.cols:
        return SumColumns(lin, group)
    return GatherRows(lin, group, spans(plan.config.n_embd, group.world), in_sizes)


def _wrap_block(blk, plan: ShardPlan, group: Group, full) -> None:
    """Swap attn_output / ffn_down (and the experts) of one block for their sharded forms."""
    h, il, world = _holder(blk), blk.il, group.world
    k = full[f"blk.{il}.attn_output.weight"].shape[1]
    in_attn = attn_in_sizes(plan.full_config, il, k, world)
    h.wo = _combine(h.wo, f"blk.{il}.attn_output.weight", plan, group, in_attn)
    moe = getattr(blk, "moe", None)
    down = f"blk.{il}.ffn_down_shexp.weight" if moe is not None else f"blk.{il}.ffn_down.weight"
    h.w_down = _combine(h.w_down, down, plan, group, spans(full[down].shape[1], world))
    if moe is not None:
        blk.moe = ShardedExperts(moe, group, *plan.experts[il])


def wrap_model(model, plan: ShardPlan, group: Group, full: dict) -> None:
    """Every cross-rank combination of a model built from a shard plan's tensors."""
    world, (lo, hi) = group.world, plan.vocab
    model.supports_cuda_graphs = False  # collectives between the kernels of a step
    for blk in model.blocks:
        _wrap_block(blk, plan, group, full)
    model.embed = VocabEmbedding(model.embed, group, lo, hi)
    if getattr(model, "pl_embed", None) is not None:  # Gemma 4's per-layer token embedding
        model.pl_embed = VocabEmbedding(model.pl_embed, group, lo, hi)
    model.output = GatherRows(model.output, group, plan.vocab_sizes, None)
    if model.mtp is None:
        return
    trunk_head = full.get("output.weight") or full["token_embd.weight"]
    for il, n in zip(range(plan.config.n_layer, plan.config.n_layer_all), model.mtp.heads, strict=True):  # fmt: skip
        _wrap_block(n.block, plan, group, full)
        n.eh_proj = GatherRows(n.eh_proj, group, spans(plan.config.n_embd, world), None)
        b = f"blk.{il}.nextn."
        own_head = full.get(b + "shared_head_head.weight")
        if own_head is not None:
            n.head = GatherRows(n.head, group, plan.vocab_sizes, None)
        else:
            n.head = model.output
        # a draft vocabulary picks rows of the whole head (replicated: a shortlist is small)
        n.head_weight = own_head if own_head is not None else trunk_head
        if full.get(b + "embed_tokens.weight") is not None:
            n.embed = VocabEmbedding(n.embed, group, lo, hi)
        else:
            n.embed = model.embed
