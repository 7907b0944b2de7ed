"""The drafter of a Gemma 4 MTP assistant (`-md assistant.gguf --mtp`): `AssistantBatchDrafter`
drafts for any number of sequences (the `BatchDrafter` of core/decode/drafter.py, as the server's
slots use it), `AssistantDrafter` is the one-sequence `Drafter` over it (`llm run`, `llm bench`).

The assistant keeps no KV of its own: each draft step attends over the target's KV of its own
sequence as it stands (the committed positions 0 .. n_past - 1) and writes nothing, so there is
nothing to mirror or roll back. A sequence's whole state is the target's post-final-norm hidden
state of the last row the target evaluated (`observe`: the row whose logits gave the token `last`
the round drafts after) and the position it reached. Step 0 reads (last, that hidden) at position
n_past; step i reads (draft i - 1, the previous step's post-projected hidden), at the same position
n_past. A batched step is one assistant forward over one row per drafting sequence, each row at its
own sequence's position, attending only to its own sequence's KV (the reader: the contiguous cache
in place, or the paged pool through a single-sequence workspace, core/serve/drafting.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.core.decode.draft import Draft, Pick
from llmkit.core.decode.drafter import SINGLE_HEAD_MAX_DRAFT, DraftJob
from llmkit.core.decode.loop import Speculation
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.models.gemma4_assistant import attend_readonly, is_assistant, load_assistant
from llmkit.errors import LlmkitError


@dataclass
class AssistantState:
    """One sequence: its target KV (a KVCache or a paged SeqKV), the positions the target has
    evaluated and shown, and the post-norm hidden [1, H_target] of row end - 1."""

    seq: object
    end: int = 0
    pending: torch.Tensor | None = None


class CacheReader:
    """The target's single-sequence KVCache, read in place."""

    def __init__(self, cache):
        self.type_k, self.type_v = cache.type_k, cache.type_v

    def attend(self, seq, il: int, q: torch.Tensor, pos: int, window: int | None):
        return attend_readonly(seq, il, q, pos, window)

    def plan(self) -> dict:
        return {"layers": [], "bytes": 0, "groups": {}}


class AssistantBatchDrafter:
    shares_prefix = True  # only the last evaluated row's hidden is needed

    def __init__(self, assistant, reader, max_draft: int = SINGLE_HEAD_MAX_DRAFT):
        from llmkit.core.cache.turbo import TURBO_TYPES

        turbo = [t for t in (reader.type_k, reader.type_v) if t in TURBO_TYPES]
        if turbo:  # its Q-only attention reads K/V as vectors, not in the codes' rotated basis
            raise LlmkitError(f"the gemma4 assistant drafter does not read {turbo[0]} KV yet")
        self.assistant, self.reader, self.limit = assistant, reader, max_draft

    def max_draft(self, requested: int) -> int:
        return min(requested, self.limit)

    def open(self, target=None) -> AssistantState:
        return AssistantState(target)

    def close(self, st: AssistantState) -> None:
        st.seq, st.pending = None, None

    def observe(self, st: AssistantState, p0: int, tokens: torch.Tensor, hidden: torch.Tensor):
        if tokens.numel():
            st.pending = self.assistant.target_hidden(hidden[-1:])
            st.end = p0 + tokens.numel()

    def rollback(self, st: AssistantState, p: int) -> None:
        if p < st.end:  # the hidden pairing with row p comes from the next observed batch
            st.pending, st.end = None, p

    def catch_up(self, states: list) -> None:
        """Nothing to mirror: the assistant reads the target's KV."""

    def draft(self, jobs: list[DraftJob], p_min: float = 0.0) -> list[Draft]:
        """Up to job.k tokens for every job, one assistant forward per step over the rows of
        the jobs still drafting. A job whose target KV is not where it observed drafts nothing
        (the caller then verifies `last` alone)."""
        out = [Draft() for _ in jobs]
        live = [
            i
            for i, j in enumerate(jobs)
            if j.k > 0
            and j.state.pending is not None
            and j.state.end > 0
            and j.state.seq.n_past == j.state.end
        ]
        toks = {i: jobs[i].last for i in live}
        hs = {i: jobs[i].state.pending for i in live}
        with torch.inference_mode():
            for step in range(max((self.max_draft(jobs[i].k) for i in live), default=0)):
                act = [i for i in live if self.max_draft(jobs[i].k) > step]
                if not act:
                    break
                sts = [jobs[i].state for i in act]

                def attend(il, q, window, sts=sts):
                    rows = [self.reader.attend(st.seq, il, q[r : r + 1], st.end, window)
                            for r, st in enumerate(sts)]  # fmt: skip
                    return torch.cat(rows) if len(rows) > 1 else rows[0]

                logits, h_next = self.assistant.rows(
                    torch.tensor([toks[i] for i in act]),
                    torch.cat([hs[i] for i in act]),
                    torch.tensor([st.end for st in sts]),
                    attend,
                )
                for r, i in enumerate(act):
                    z, b = logits[r], jobs[i].branches
                    t, q, prob = jobs[i].pick(z)
                    if prob < p_min:  # not confident: verify what this sequence has
                        live.remove(i)
                        continue
                    if step == 0 and b > 1:
                        out[i].alts = [a for a in z.topk(b).indices.tolist() if a != t][: b - 1]
                    out[i].tokens.append(t)
                    out[i].qs.append(q)
                    toks[i], hs[i] = t, h_next[r : r + 1]
        return out

    def plan(self) -> dict:
        """No KV of its own: it reads the target layers listed in `reads`."""
        return {**self.reader.plan(), "reads": list(self.assistant.src)}


class AssistantDrafter:
    """The `Drafter` of one sequence over the target's KVCache `cache`."""

    def __init__(self, assistant, cache, max_draft: int = SINGLE_HEAD_MAX_DRAFT):
        self.core = AssistantBatchDrafter(assistant, CacheReader(cache), max_draft)
        self.assistant, self.cache, self.max_draft = assistant, cache, max_draft
        self.state = self.core.open(cache)

    @property
    def n_past(self) -> int:
        return self.state.end

    def observe(self, p0: int, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        self.core.observe(self.state, p0, tokens, hidden)

    def rollback(self, p: int) -> None:
        self.core.rollback(self.state, p)

    def draft(self, last: int, k: int, pick: Pick, p_min: float = 0.0, branches: int = 1) -> Draft:
        return self.core.draft([DraftJob(self.state, last, k, pick, branches)], p_min)[0]

    def plan(self) -> dict:
        return self.core.plan()


def is_assistant_file(path) -> bool:
    """Whether the -md file is a Gemma 4 assistant (else: a NextN sidecar)."""
    return is_assistant(path)


def assistant_spec(lm, path, cache, spec_cfg: SpecConfig) -> Speculation:
    """Speculation with the assistant at `path` drafting for the loaded gemma4 model `lm`."""
    drafter = AssistantDrafter(load_assistant(path, lm.model), cache)
    spec_cfg.check(
        drafter.max_draft, f"{drafter.max_draft} (verify batch limit)", cache.attn_kernel
    )
    return Speculation(drafter, spec_cfg, SpecStats(spec_cfg.draft, branches=spec_cfg.branches))
