"""The server's batched drafter, reserved once at start-up for every slot (a reserve-only plan: a
slot's draft state never allocates or fails when a request starts):

 * NextN heads (`--mtp`, NextN blocks in the model or an `-md` sidecar): their own KV for every
   slot in paged pools (`PagedDraftKV`);
 * a Gemma 4 assistant (`--mtp -md assistant.gguf`): no KV at all, it reads the target's pool.
   Each step's rows attend, row by row, over the blocks of their own sequence in the target layer
   the assistant block reads (`PagedReader`): the visible positions of that row (those before its
   position, the last window - 1 of them on a sliding layer) are gathered into a workspace sized
   for ONE sequence (single-stream rows, as llama.cpp's `init_mtp_reserve`), never for the union
   of the slots, and reused sequence after sequence.
Both speak `BatchDrafter` (core/decode/drafter.py), so the engine never special-cases a kind.
"""

from __future__ import annotations

import torch

from llmkit.core.cache.paged import PagedKV
from llmkit.core.cache.store import KV_TYPES
from llmkit.core.decode.drafter import SINGLE_HEAD_MAX_DRAFT, NextNDrafter, PagedDraftKV
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from llmkit.quant.dequant import dequantize


class PagedReader:
    """Read-only attention of single rows over their own sequence's blocks of a paged pool."""

    def __init__(self, pool: PagedKV, layouts: dict, layers: list[int], n_ctx: int, n_slots: int):
        self.pool, self.type_k, self.type_v, self.n_slots = pool, pool.type_k, pool.type_v, n_slots
        self.keys: dict[int, int] = {}  # il -> most keys one row sees
        self.dims: dict[int, tuple[int, int]] = {}  # il -> (K, V) head sizes
        self.ws: dict[int, tuple] = {}  # il -> (K, V as stored, K, V in fp32), flat
        for il in sorted(set(layers)):
            g, spec = pool.group_of[il], layouts[il]
            n = n_ctx if g.window is None else max(1, min(n_ctx, g.window - 1))
            dev, hkv = g.k[il].device, spec.n_head_kv
            stored = [torch.empty(hkv * n * b.shape[2], dtype=b.dtype, device=dev)
                      for b in (g.k[il], g.v[il])]  # fmt: skip
            dims = (spec.head_dim_k, spec.head_dim_v)
            fp32 = [
                torch.empty(hkv * n * d if KV_TYPES[t] != torch.float32 else 0, device=dev)
                for d, t in zip(dims, (pool.type_k, pool.type_v), strict=True)
            ]  # f32 K/V are read from the stored copy as they are
            self.keys[il], self.dims[il], self.ws[il] = n, dims, (*stored, *fp32)
        dev = self.ws[min(self.ws)][0].device
        self.visible = torch.ones(max(self.keys.values()), dtype=torch.bool, device=dev)

    def _load(self, il: int, which: int, kind: str, slots: torch.Tensor) -> torch.Tensor:
        """Slots of layer il's K (which 0) or V (1) into the workspace, as fp32 [Hkv, n, D]."""
        g = self.pool.group_of[il]
        buf = (g.k if which == 0 else g.v)[il]
        hkv, n, row = buf.shape[0], slots.numel(), buf.shape[2]
        raw = self.ws[il][which][: hkv * n * row].view(hkv, n, row)
        torch.index_select(buf, 1, slots, out=raw)
        t = KV_TYPES[kind]
        if t == torch.float32:
            return raw
        d = self.dims[il][which]
        out = self.ws[il][2 + which][: hkv * n * d].view(hkv, n, d)
        return out.copy_(raw if isinstance(t, torch.dtype) else dequantize(raw, t))

    def attend(self, seq, il: int, q: torch.Tensor, pos: int, window: int | None):
        """q [T, Hq, D] (rows of one sequence at position pos) over that sequence's keys at
        positions < pos (the last window - 1 of them for a sliding layer): [T, Hq * D]."""
        g, bs = self.pool.group_of[il], self.pool.bs
        lo = 0 if window is None else max(0, pos - window + 1)
        n = pos - lo
        if n > self.keys[il] or pos > seq.n_past:  # the reservation's shape: a bug if reached
            raise LlmkitError(f"assistant row at {pos} reads {n} keys of a {seq.n_past} sequence")
        kp = torch.arange(lo, pos)
        blocks = torch.tensor(seq.tables[g.name], dtype=torch.int64)[kp // bs]
        if n and int(blocks.min()) < 0:
            raise LlmkitError(f"assistant row at {pos}: its {g.name} keys were freed")
        slots = (blocks * bs + kp % bs).to(q.device)
        K = self._load(il, 0, self.type_k, slots)
        V = self._load(il, 1, self.type_v, slots)
        mask = self.visible[:n][None].expand(q.shape[0], n)
        return ops.attention_torch(q, K, V, mask, 1.0)

    def plan(self) -> dict:
        ws = {il: sum(t.numel() * t.element_size() for t in b) for il, b in self.ws.items()}
        return {
            "slots": self.n_slots,
            "bytes": 0,  # no draft KV: the assistant reads the target's pool
            "bytes_per_slot": 0,
            "workspace": {
                "shape": "one sequence (single-stream rows), reused by every slot",
                "keys": dict(self.keys),
                "bytes": sum(ws.values()) + self.visible.numel(),
            },
            "rows_max": self.n_slots,  # one row per drafting slot per step
        }


def reserve_drafter(lm, opts, pool: PagedKV):
    """The batched drafter of every slot (a `BatchDrafter`), its memory reserved now."""
    if opts.assistant is not None:
        from llmkit.core.decode.assistant import AssistantBatchDrafter
        from llmkit.core.models.gemma4_assistant import load_assistant

        limit = min(SINGLE_HEAD_MAX_DRAFT, opts.max_rows - 1)
        if not 1 <= opts.draft <= limit:
            raise LlmkitError(f"--draft must be between 1 and {limit}, got {opts.draft}")
        assistant = load_assistant(opts.assistant, lm.model)
        if any(il not in pool.group_of for il in assistant.src):
            raise LlmkitError("the assistant reads target layers the KV pool does not hold")
        layouts = lm.model.kv_layout()
        reader = PagedReader(pool, layouts, assistant.src, opts.n_ctx, opts.n_slots)
        return AssistantBatchDrafter(assistant, reader, limit)
    heads = lm.model.mtp
    if heads is None:
        raise LlmkitError("--mtp: this model has no NextN (MTP) blocks loaded")
    limit = min(heads.n_heads if heads.n_heads > 1 else SINGLE_HEAD_MAX_DRAFT, opts.max_rows - 1)
    if not 1 <= opts.draft <= limit:
        raise LlmkitError(f"--draft must be between 1 and {limit}, got {opts.draft}")
    kv = PagedDraftKV(
        heads,
        opts.n_slots,
        opts.n_ctx,
        opts.kv_block_size,
        max(opts.n_ubatch, opts.draft + 1),
        opts.type_k_draft,
        opts.type_v_draft,
        lm.backend.device,
    )
    return NextNDrafter(heads, kv)
