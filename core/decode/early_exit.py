"""Early exit (`--n-layer-exit L`): the first L trunk layers, then the output norm and LM head.

Alone it is a smaller model (`ExitModel`: its KV cache holds layers < L only). With
`--spec early-exit` it is a drafter with no extra weights (`EarlyExitDrafter`): each draft step
runs the first L layers of the target on one token *in the target's own cache*, so the drafted rows
write K/V of layers < L at positions p0, p0 + 1, ... (every group's slot bookkeeping advances with
them: layers >= L hold stale rows there, which no one reads). After drafting the cache is truncated
back to p0; the verify batch [last, drafts...] then rewrites those positions with every layer and
the acceptance rule (core/decode/speculative.py) keeps what the full model agrees with. The draft
writes k rows at most, fewer than the verify batch (k + 1 rows) that a sliding ring's margin is
sized for, so a rollback never loses a position still inside a window.
"""

from __future__ import annotations

import torch

from llmkit.core.decode.draft import Draft, Pick
from llmkit.core.decode.loop import Speculation
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.model.protocol import CausalLM, ForwardOutput, Rows
from llmkit.errors import LlmkitError

SPEC_TYPES = ("mtp", "early-exit")
MAX_DRAFT = 16  # a draft is k sequential passes: longer ones cost more than they can save
# (general.architecture, n_layer) -> the best --n-layer-exit measured (docs/BENCHMARKS.md)
DEFAULT_EXIT: dict[tuple[str, int], int] = {("llama", 30): 27, ("gemma3", 18): 17}


def check_exit(n_layer_exit: int, n_layer: int, drafting: bool) -> None:
    """--n-layer-exit must leave at least one layer (and, to draft, fewer than all of them)."""
    hi = n_layer - 1 if drafting else n_layer
    if not 1 <= n_layer_exit <= hi:
        why = "; a drafter needs fewer" if drafting else ""
        raise LlmkitError(
            f"--n-layer-exit must be between 1 and {hi} (the model has {n_layer} layers{why}), "
            f"got {n_layer_exit}"
        )


def spec_type(spec: str | None, mtp: bool) -> str | None:
    """The drafter a run asked for: --spec NAME, or --mtp (= --spec mtp); None: no drafting."""
    if spec is not None and spec not in SPEC_TYPES:
        raise LlmkitError(f"unknown --spec {spec!r} (known: {', '.join(SPEC_TYPES)})")
    if mtp and spec not in (None, "mtp"):
        raise LlmkitError(
            f"--mtp drafts with NextN heads: it cannot be combined with --spec {spec}"
        )
    return "mtp" if mtp else spec


class ExitModel:
    """A CausalLM that is the first `n_layer` trunk layers of `model` with its norm and head."""

    supports_cuda_graphs = False

    def __init__(self, model: CausalLM, n_layer: int):
        check_exit(n_layer, model.config.n_layer, drafting=False)
        self.model, self.n_layer = model, n_layer
        self.config, self.mtp = model.config, None

    def kv_layout(self) -> dict:
        return {il: s for il, s in self.model.kv_layout().items() if il < self.n_layer}

    def forward(
        self, tokens: torch.Tensor, cache, logits: Rows = "last", n_layer: int | None = None
    ) -> ForwardOutput:
        n = self.n_layer if n_layer is None else min(n_layer, self.n_layer)
        return self.model.forward(tokens, cache, logits, n)

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_logits(x)


class EarlyExitDrafter:
    """The `Drafter` that runs the target's first `n_layer_exit` layers over the target's cache."""

    kind = "early-exit"

    def __init__(self, model: CausalLM, cache, n_layer_exit: int, max_draft: int = MAX_DRAFT):
        check_exit(n_layer_exit, model.config.n_layer, drafting=True)
        self.model, self.cache, self.n_layer_exit = model, cache, n_layer_exit
        # the verify batch that follows is the ring margin's job; the draft is one row shorter
        self.max_draft = min(max_draft, cache.margin - 1)

    def observe(self, p0: int, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """Nothing to mirror: the draft reads the target's own KV of layers < n_layer_exit."""

    def rollback(self, p: int) -> None:
        """Nothing to forget: the target's cache rollback is the drafter's."""

    def draft(self, last: int, k: int, pick: Pick, p_min: float = 0.0, branches: int = 1) -> Draft:
        """Up to k tokens after `last` (at position n_past, not in the cache yet): one early-exit
        pass per token, each on top of the rows the previous ones wrote; the cache is then back
        at n_past."""
        cache, out = self.cache, Draft()
        p0, tok = cache.n_past, last
        try:
            for step in range(k):
                h = self.model.forward(
                    torch.tensor([tok]), cache, logits=None, n_layer=self.n_layer_exit
                ).hidden
                z = self.model.lm_logits(h[-1:])[0]
                tok, q, prob = pick(z)
                if prob < p_min:  # not confident: verify what there is (maybe nothing)
                    break
                if step == 0 and branches > 1:  # siblings of d0 for a draft tree
                    out.alts = [a for a in z.topk(branches).indices.tolist() if a != tok]
                    out.alts = out.alts[: branches - 1]
                out.tokens.append(tok)
                out.qs.append(q)
                if step + 1 == k:
                    break  # the last draft token needs no pass of its own
        finally:
            cache.truncate(p0)
        return out

    def plan(self) -> dict:
        """Its KV is the target's: report the layers it shares and no bytes of its own."""
        layers = [il for il in self.model.kv_layout() if il < self.n_layer_exit]
        return {
            "layers": layers,
            "bytes": 0,
            "type_k": self.cache.type_k,
            "type_v": self.cache.type_v,
            "groups": {},
            "shared_with": "main",
        }


def default_exit(arch: str, n_layer: int) -> int:
    """--n-layer-exit when --spec early-exit is given without it (docs/BENCHMARKS.md, "Early
    exit"): the measured best of the reference models (SmolLM2-135M, Gemma 3 270M), else 90% of
    the trunk (SmolLM2's best; an early exit needs most layers to agree with the full model)."""
    return DEFAULT_EXIT.get((arch, n_layer), max(1, min(n_layer - 1, round(0.9 * n_layer))))


def exit_layers(lm, kind: str | None, n_layer_exit: int) -> int:
    """The exit layer a load asked for (0: none). Alone (`--n-layer-exit L` without a drafter)
    the loaded model becomes its first L layers, before its KV cache is sized."""
    n = lm.config.n_layer
    if kind == "early-exit":
        L = n_layer_exit or default_exit(lm.arch, n)
        check_exit(L, n, drafting=True)
        return L
    if n_layer_exit:
        if kind == "mtp":
            raise LlmkitError("--n-layer-exit cannot be combined with --mtp (NextN heads read the "
                              "last layer's hidden state)")  # fmt: skip
        lm.model = ExitModel(lm.model, n_layer_exit)
    return n_layer_exit


def early_exit_spec(model: CausalLM, cache, n_layer_exit: int, cfg: SpecConfig) -> Speculation:
    """The Speculation of `--spec early-exit` over the target's cache (settings checked)."""
    drafter = EarlyExitDrafter(model, cache, n_layer_exit)
    cfg.check(
        drafter.max_draft, f"{drafter.max_draft} sequential early-exit passes", cache.attn_kernel
    )
    stats = SpecStats(cfg.draft, branches=cfg.branches, kind=EarlyExitDrafter.kind)
    return Speculation(drafter, cfg, stats)
