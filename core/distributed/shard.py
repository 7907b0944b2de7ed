"""Which part of each GGUF tensor a tensor-parallel rank holds, cut from the raw blocks.

Two ways to cut a matmul weight W [out, in] (GGUF rows are outputs):
  * by rows (a slice of the outputs): whole rows of blocks, so every type can be cut anywhere;
  * by columns (a slice of the inputs): only at block boundaries (legacy types Q4_0 .. Q8_0 and
    IQ4_NL: 32 values; K-quants and IQ4_XS: 256; F32 / F16 / BF16: anywhere).

What each rank holds (rank r of N, contiguous ranges):
  attn_q / attn_gate      rows of its query heads; attn_k / attn_v rows of its KV heads. A rank
                          holds whole GQA groups: a contiguous share of the KV heads (uneven when
                          they do not divide: SmolLM2's 3 on 2 ranks are 2 + 1) and their query
                          heads. Fewer KV heads than ranks (Gemma 3 270M: 1 KV head, 4 query
                          heads): each KV head is replicated on world / n_kv ranks, each holding
                          an even share of its query heads; a split that does not divide so is a
                          one-line error.
  ffn_gate / ffn_up       rows r*F/N .. (also the shared expert's *_shexp)
  attn_output, ffn_down   mode "exact" (default): rows r*H/N ..: the input is all-gathered first
                          and the outputs all-gathered after, so every output element is the same
                          kernel call as without TP (bit-identical greedy output).
                          mode "sum": columns of its heads / its F slice (Megatron row-parallel:
                          partial sums added in rank order, not bit-identical to tp=1); a tensor
                          whose cut would split a block falls back to the "exact" cut.
  token_embd, output      rows of its vocabulary slice (vocab-parallel embedding and LM head)
  *_exps (MoE)            its experts r*E/N .. (whole experts)
  nextn.eh_proj           rows (all-gathered); shared_head_head / embed_tokens: vocabulary rows
  norms, router, rope     replicated
  per-layer inputs        Gemma 4: per_layer_token_embd by vocabulary rows (like token_embd);
                          per_layer_model_proj and each block's inp_gate / proj replicated (they
                          act on whole rows: every rank computes them whole, as without TP)

Gemma 4's KV-shared layers (no attn_k / attn_v) read their owner's cache: the owner is a layer of
the same type, so the same KV-head count and the same split, and a rank's query heads find their
KV heads in its own cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES

from llmkit.errors import LlmkitError
from llmkit.quant.tensor import QTensor

MODES = ("exact", "sum")
SUPPORTED_ARCHS = ("llama", "step35", "gemma3", "gemma4")


def span(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous share [lo, hi) of n items (the first n % world ranks get one more)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def spans(n: int, world: int) -> list[int]:
    return [b - a for a, b in (span(n, world, r) for r in range(world))]


def row_slice(t: QTensor, lo: int, hi: int, unit: int = 1) -> QTensor:
    """Rows [lo*unit, hi*unit) of a 2-D tensor (or experts [lo, hi) of a 3-D one): a view."""
    a, b = lo * unit, hi * unit
    return QTensor(f"{t.name}[{a}:{b}]", t.qtype, (b - a, *t.shape[1:]), t.raw[a:b], t.mapped)


def block_size(t: QTensor) -> int:
    return GGML_QUANT_SIZES[t.qtype][0]


def col_slice(t: QTensor, lo: int, hi: int) -> QTensor:
    """Input columns [lo, hi) of a 2-D tensor, cut between blocks (a copy of those blocks)."""
    blk, nbytes = GGML_QUANT_SIZES[t.qtype]
    if lo % blk or hi % blk:
        raise LlmkitError(
            f"tensor parallel: {t.name} ({t.qtype.name}) cannot be cut at column {lo}..{hi}: "
            f"its blocks hold {blk} values"
        )
    rows, k = t.shape
    raw = t.raw.reshape(rows, k // blk, nbytes)[:, lo // blk : hi // blk]
    return QTensor(
        f"{t.name}[:, {lo}:{hi}]", t.qtype, (rows, hi - lo), raw.reshape(rows, -1).contiguous()
    )


def col_cut_ok(t: QTensor, bounds: list[int]) -> bool:
    return all(b % block_size(t) == 0 for b in bounds)


@dataclass
class ShardPlan:
    """Rank `rank` of `world`: its tensors, its config, and how each cut linear combines."""

    rank: int
    world: int
    mode: str
    config: object  # the rank's (its heads)
    full_config: object  # the file's
    tensors: dict[str, QTensor]
    vocab: tuple[int, int]  # its vocabulary rows [lo, hi)
    vocab_sizes: list[int]
    cols: set[str] = field(default_factory=set)  # tensors cut by columns (mode "sum")
    experts: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> experts [lo, hi)
    notes: list[str] = field(default_factory=list)


def _per_layer(v, n: int) -> list[int]:
    return list(v) if isinstance(v, list) else [v] * n


def replicates_kv(hq: int, hkv: int, world: int) -> bool:
    """Fewer KV heads than ranks, split by replicating each KV head on world / hkv ranks."""
    return hkv < world and world % hkv == 0 and hq % world == 0


def heads(hq: int, hkv: int, world: int, rank: int) -> tuple[int, int, int, int]:
    """Rank's query heads [qlo, qhi) and KV heads [klo, khi): whole GQA groups, or (fewer KV
    heads than ranks) an even share of one replicated KV head's query heads."""
    g = hq // hkv
    if hkv >= world:
        klo, khi = span(hkv, world, rank)
        return klo * g, khi * g, klo, khi
    qlo, qhi = span(hq, world, rank)
    return qlo, qhi, qlo // g, qlo // g + 1


def _pairs(cfg) -> list[tuple[int, int]]:
    """(query heads, KV heads) of every layer."""
    n = cfg.n_layer_all
    return list(zip(_per_layer(cfg.n_head, n), _per_layer(cfg.n_head_kv, n), strict=True))


def _q_uniform(cfg, world: int, rank: int) -> bool:
    """One query-head count for every layer on this rank (a config with one n_head needs it)."""
    counts = {qhi - qlo for qlo, qhi, _, _ in (heads(*p, world, rank) for p in _pairs(cfg))}
    return len(counts) == 1


def check_shardable(arch: str, cfg, world: int, mode: str = "exact") -> None:
    """The one-line refusals, before any rank is started."""
    if mode not in MODES:
        raise LlmkitError(f"--tp-mode must be one of {', '.join(MODES)}, got {mode!r}")
    if world < 1:
        raise LlmkitError(f"--tp must be >= 1, got {world}")
    if world == 1:
        return
    if arch not in SUPPORTED_ARCHS:
        raise LlmkitError(
            f"--tp: architecture {arch} is not supported (tensor parallelism: "
            f"{', '.join(SUPPORTED_ARCHS)})"
        )
    if arch == "gemma4" and getattr(cfg, "n_expert", 0):
        raise LlmkitError(f"--tp: {arch} mixture-of-experts blocks are not split across ranks")
    n = cfg.n_layer_all
    for il, (hq, hkv) in enumerate(_pairs(cfg)):
        if hkv < world and not replicates_kv(hq, hkv, world):
            raise LlmkitError(
                f"--tp {world}: layer {il} has {hkv} KV heads and {hq} query heads: each rank "
                f"holds whole KV-head groups, or one replicated KV head and an even share of "
                f"its query heads"
            )
    if isinstance(cfg.n_head, int) and not all(_q_uniform(cfg, world, r) for r in range(world)):
        raise LlmkitError(
            f"--tp {world}: {cfg.n_head} query heads split unevenly over layers with "
            f"{sorted(set(_per_layer(cfg.n_head_kv, n)))} KV heads"
        )
    if cfg.n_vocab < world or cfg.n_embd < world:
        raise LlmkitError(f"--tp {world}: the model is too small to split {world} ways")


def _cut_out(name: str, t: QTensor, cfg, world: int, rank: int, plan: ShardPlan) -> QTensor:
    """The rank's part of one tensor (see the module docstring)."""
    parts = name.split(".")
    if name in (
        "token_embd.weight",
        "output.weight",
        "per_layer_token_embd.weight",
    ) or name.endswith((".nextn.shared_head_head.weight", ".nextn.embed_tokens.weight")):
        return row_slice(t, *plan.vocab)
    if parts[0] != "blk" or len(t.shape) < 2:
        return t  # norms, rope factors, biases
    il, kind = int(parts[1]), parts[-2]
    n = cfg.n_layer_all
    hq, hkv = _per_layer(cfg.n_head, n)[il], _per_layer(cfg.n_head_kv, n)[il]
    qlo, qhi, klo, khi = heads(hq, hkv, world, rank)
    if kind == "attn_q":
        return row_slice(t, qlo, qhi, t.shape[0] // hq)
    if kind in ("attn_k", "attn_v"):
        return row_slice(t, klo, khi, t.shape[0] // hkv)
    if kind == "attn_gate":
        return row_slice(t, qlo, qhi)
    if kind in ("ffn_gate", "ffn_up", "ffn_gate_shexp", "ffn_up_shexp"):
        return row_slice(t, *span(t.shape[0], world, rank))
    if kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        plan.experts[il] = span(t.shape[0], world, rank)
        return row_slice(t, *plan.experts[il])
    if kind == "ffn_gate_inp":
        return t  # the router: every rank routes every token
    if kind in ("attn_output", "ffn_down", "ffn_down_shexp"):
        k = t.shape[1]
        sizes = attn_in_sizes(cfg, il, k, world) if kind == "attn_output" else spans(k, world)
        bounds = [sum(sizes[:i]) for i in range(world + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        if plan.mode == "sum" and col_cut_ok(t, bounds):
            plan.cols.add(name)
            return col_slice(t, lo, hi)
        if plan.mode == "sum" and rank == 0:
            plan.notes.append(
                f"{name} ({t.qtype.name}, {k} columns) cannot be cut between its "
                f"{block_size(t)}-value blocks at {bounds[1:-1]}: cut by rows instead"
            )
        return row_slice(t, *span(t.shape[0], world, rank))
    if kind in ("inp_gate", "proj"):
        return t  # Gemma 4's per-layer input gate and projection: replicated
    if kind == "eh_proj":
        return row_slice(t, *span(t.shape[0], world, rank))
    raise LlmkitError(f"tensor parallel: no rule to split {name} {list(t.shape)}")


def local_config(cfg, world: int, rank: int):
    """The config a rank builds its blocks from: its KV heads (an uneven share when they do not
    divide: 3 KV heads on 2 ranks are 2 + 1) with their query heads; the KV cache follows."""
    c = copy.copy(cfg)

    def mine(hq: int, hkv: int) -> tuple[int, int]:
        qlo, qhi, klo, khi = heads(hq, hkv, world, rank)
        return qhi - qlo, khi - klo

    pairs = [mine(q, k) for q, k in _pairs(cfg)]
    c.n_head = [p[0] for p in pairs] if isinstance(c.n_head, list) else pairs[0][0]
    c.n_head_kv = [p[1] for p in pairs] if isinstance(c.n_head_kv, list) else pairs[0][1]
    if hasattr(c, "kv_heads"):  # Gemma 4's per-layer lists, derived from the file's config
        c.kv_heads = [p[1] for p in pairs[: len(c.kv_heads)]]
        c.ff = [b - a for a, b in (span(f, world, rank) for f in c.ff)]
    return c


def attn_in_sizes(cfg, il: int, k: int, world: int) -> list[int]:
    """attn_output's input columns (k of them in all) held by each rank: its query heads."""
    n = cfg.n_layer_all
    hq, hkv = _per_layer(cfg.n_head, n)[il], _per_layer(cfg.n_head_kv, n)[il]
    return [(b - a) * (k // hq) for a, b, _, _ in (heads(hq, hkv, world, r) for r in range(world))]


def plan_shard(arch: str, cfg, tensors: dict[str, QTensor], world: int, rank: int,
               mode: str = "exact") -> ShardPlan:  # fmt: skip
    """Rank `rank`'s tensors and config."""
    check_shardable(arch, cfg, world, mode)
    vocab = span(cfg.n_vocab, world, rank)
    plan = ShardPlan(
        rank, world, mode, local_config(cfg, world, rank), cfg, {}, vocab, spans(cfg.n_vocab, world)
    )
    plan.tensors = {k: _cut_out(k, t, cfg, world, rank, plan) for k, t in tensors.items()}
    return plan
