"""The drafter of a Gemma 4 MTP assistant (`-md assistant.gguf --mtp`), behind the `Drafter`
interface of core/decode/drafter.py.

The assistant keeps no KV of its own: each draft step attends over the target's cache as it
stands (the committed positions 0 .. n_past - 1) and writes nothing, so there is nothing to
mirror or roll back. What it keeps is the target's post-final-norm hidden state of the last row
the target evaluated (`observe`): the row whose logits gave the token `last` that the round
drafts after. Step 0 reads (last, that hidden) at position n_past; step i reads (draft i - 1,
the previous step's post-projected hidden), at the same position n_past.
"""

from __future__ import annotations

import torch

from llmkit.core.decode.drafter import SINGLE_HEAD_MAX_DRAFT, Draft, Pick
from llmkit.core.decode.loop import Speculation
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.models.gemma4_assistant import is_assistant, load_assistant
from llmkit.errors import LlmkitError


class AssistantDrafter:
    def __init__(self, assistant, cache, max_draft: int = SINGLE_HEAD_MAX_DRAFT):
        from llmkit.core.cache.turbo import TURBO_TYPES

        turbo = [t for t in (cache.type_k, cache.type_v) if t in TURBO_TYPES]
        if turbo:  # its Q-only attention reads K/V as vectors, not in the codes' rotated basis
            raise LlmkitError(f"the gemma4 assistant drafter does not read {turbo[0]} KV yet")
        self.assistant, self.cache = assistant, cache
        self.max_draft = max_draft
        self.pending: torch.Tensor | None = None  # [1, H_target] post-norm hidden of row end - 1
        self.end = 0  # positions the target has evaluated and shown

    @property
    def n_past(self) -> int:
        return self.end

    def observe(self, p0: int, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        if tokens.numel():
            self.pending = self.assistant.target_hidden(hidden[-1:])
            self.end = p0 + tokens.numel()

    def rollback(self, p: int) -> None:
        if p < self.end:  # the hidden pairing with row p comes from the next observed batch
            self.pending, self.end = None, p

    def draft(self, last: int, k: int, pick: Pick, p_min: float = 0.0, branches: int = 1) -> Draft:
        out = Draft()
        pos = self.cache.n_past
        if self.pending is None or pos == 0 or pos != self.end:
            return out  # nothing to draft from (the loop then verifies `last` alone)
        tok, h = last, self.pending
        with torch.inference_mode():
            for step in range(min(k, self.max_draft)):
                logits, h = self.assistant.step(torch.tensor([tok]), h, pos, self.cache)
                z = logits[0]
                t, q, prob = pick(z)
                if prob < p_min:
                    break
                if step == 0 and branches > 1:
                    out.alts = [a for a in z.topk(branches).indices.tolist() if a != t][
                        : branches - 1
                    ]
                out.tokens.append(t)
                out.qs.append(q)
                tok = t
        return out

    def plan(self) -> dict:
        """No KV of its own: it reads the target layers listed in `reads`."""
        return {"layers": [], "bytes": 0, "groups": {}, "reads": list(self.assistant.src)}


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
