"""The Python API: a loaded model that generates text, what `llm run` drives as well.

    import llmkit
    lm = llmkit.load("smollm2-135m")                 # a GGUF path or a known model name
    print(lm.generate("The capital of France is", n_predict=16, temp=0))
    for piece in lm.generate("Once upon a time", n_predict=64, stream=True):
        print(piece, end="", flush=True)
    lm = llmkit.load("gemma3-270m", mtp=True, draft=2)   # speculative decoding with MTP heads

The object keeps one KV cache: a prompt that starts with what the cache holds (a chat's earlier
turns) evaluates only its new tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmkit.core.decode.loop import GenStats, Speculation, generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import LoadedModel, load_model
from llmkit.core.tokenizer import Tokenizer, load_tokenizer
from llmkit.core.tokenizer.chat import ChatFormat
from llmkit.errors import LlmkitError


@dataclass
class LoadOptions:
    """Everything fixed at load time (llama-cli's model and context flags)."""

    n_ctx: int = 4096  # 0: the model's training context
    n_ubatch: int = 512
    device: str = "cpu"
    type_k: str = "f16"
    type_v: str = "f16"
    mtp: bool = False  # speculative decoding with the model's NextN (MTP) blocks
    model_draft: str | None = None  # MTP-only sidecar GGUF
    draft: int = 3
    draft_p_min: float = 0.0
    draft_branches: int = 1  # > 1: draft trees (greedy only)
    type_k_draft: str = "f16"
    type_v_draft: str = "f16"
    moe_n_expert: int | None = None


class TextStream:
    """Token ids in, text pieces out; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token: int) -> str:
        return self.dec.decode(self.tok.token_to_piece(token))

    def end(self) -> str:
        return self.dec.decode(b"", final=True)


@dataclass
class LLM:
    lm: LoadedModel
    tokenizer: Tokenizer
    cache: object  # KVCache
    opts: LoadOptions
    spec: Speculation | None = None
    stats: GenStats = field(default_factory=GenStats)
    history: list[int] = field(default_factory=list)  # tokens whose K/V the cache holds
    warnings: list[str] = field(default_factory=list)
    _chat: ChatFormat | None = field(default=None, repr=False)

    @classmethod
    def load(cls, model: str | Path | None = None, **options) -> LLM:
        """Load a GGUF file or a known model name (None: the default model). Options are the
        fields of `LoadOptions`."""
        known = {f.name for f in fields(LoadOptions)}
        bad = sorted(set(options) - known)
        if bad:
            raise LlmkitError(f"unknown load option(s) {', '.join(bad)} (known: {sorted(known)})")
        opts = LoadOptions(**options)
        spec_cfg = SpecConfig(opts.draft, opts.draft_p_min, opts.draft_branches)
        spec_cfg.check_values()
        draft_path = resolve_model(opts.model_draft) if opts.model_draft else None
        if draft_path and not opts.mtp:
            raise LlmkitError("-md/--model-draft is the MTP sidecar: it needs --mtp")
        lm = load_model(
            resolve_model(model),
            device=opts.device,
            mtp=opts.mtp,
            draft_path=draft_path,
            moe_n_expert=opts.moe_n_expert,
        )
        warnings = []
        n_ctx = opts.n_ctx or lm.config.n_ctx_train
        if n_ctx > lm.config.n_ctx_train:
            warnings.append(
                f"-c {n_ctx} exceeds the model's training context {lm.config.n_ctx_train}"
            )
        # the ring margin must hold a prompt chunk and a whole verify batch (rollback safety)
        margin = max(opts.n_ubatch, 64, spec_cfg.verify_rows)
        cache = lm.new_cache(n_ctx, margin=margin, type_k=opts.type_k, type_v=opts.type_v)
        self = cls(lm, load_tokenizer(lm.metadata), cache, opts, warnings=warnings)
        if opts.mtp:
            from llmkit.core.decode.drafter import MTPDrafter

            heads = lm.model.mtp
            drafter = MTPDrafter(
                heads, n_ctx, margin, opts.type_k_draft, opts.type_v_draft, lm.backend.device
            )
            why = (
                f"the model's {heads.n_heads} chained NextN blocks"
                if heads.n_heads > 1
                else f"{drafter.max_draft} (verify batch limit)"
            )
            spec_cfg.check(drafter.max_draft, why, cache.attn_kernel)
            stats = SpecStats(spec_cfg.draft, branches=spec_cfg.branches)
            self.spec = Speculation(drafter, spec_cfg, stats)
        return self

    # -- text -------------------------------------------------------------------------------------
    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        stream = TextStream(self.tokenizer)
        return "".join(stream.put(t) for t in ids) + stream.end()

    @property
    def chat_format(self) -> ChatFormat:
        if self._chat is None:
            tok = self.tokenizer
            bos = tok.id_to_text(tok.bos_id) if tok.bos_id is not None else ""
            eos = tok.id_to_text(tok.eos_id) if tok.eos_id is not None else ""
            self._chat = ChatFormat(self.lm.metadata, self.lm.arch, bos, eos)
        return self._chat

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The token ids of `messages` rendered with the GGUF's chat template (generation
        prompt added); a template that fails falls back to the built-in format, with a
        warning added to `warnings`."""
        fmt, tok = self.chat_format, self.tokenizer
        n_warn = len(fmt.warnings)
        text = fmt.render(messages, add_generation_prompt=True)
        self.warnings.extend(fmt.warnings[n_warn:])
        ids = self.tokenize(text)
        if len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
            ids = ids[1:]  # the template already wrote BOS
        return ids

    # -- generation ----------------------------------------------------------------------------------
    def generate_ids(
        self, ids: list[int], params: SamplerParams, n_predict: int = -1, ignore_eos: bool = False
    ) -> Iterator[int]:
        """Token ids after the prompt `ids` (reusing the cached prefix), streamed."""
        sampler = Sampler(params)
        if self.spec is not None:
            self.spec.config.check_sampling(sampler.greedy)
        start = self._reuse_prefix(ids)
        gen = generate(
            self.lm.model,
            self.cache,
            ids[start:],
            sampler,
            n_predict,
            self.tokenizer.is_eog,
            ignore_eos,
            self.stats,
            self.opts.n_ubatch,
            self.spec,
        )
        out = []
        for t in gen:
            out.append(t)
            yield t
        self.history = ids + out
        if self.cache.n_past < len(self.history):  # the last token was sampled, not evaluated
            self.history = self.history[: self.cache.n_past]

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Roll the cache back to the longest prefix it shares with `ids`; the index from which
        `ids` must be evaluated."""
        common = 0
        for a, b in zip(self.history, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always evaluate at least one token for fresh logits
        drafter = self.spec.drafter if self.spec is not None else None
        # with a drafter, re-evaluate one more token: its hidden state pairs with the next row
        start = max(0, common - 1) if drafter is not None else common
        try:
            self.cache.truncate(start)
            if drafter is not None:
                drafter.rollback(common)
        except LlmkitError:  # a sliding ring already overwrote what the shorter prefix needs
            self.cache.clear()
            if drafter is not None:
                drafter.rollback(0)
            start = 0
        self.history = self.history[:start]
        return start

    def stream(
        self, ids: list[int], params: SamplerParams, n_predict: int = -1, ignore_eos: bool = False
    ) -> Iterator[str]:
        """Text pieces of the generated tokens, as they become complete UTF-8."""
        text = TextStream(self.tokenizer)
        for t in self.generate_ids(ids, params, n_predict, ignore_eos):
            piece = text.put(t)
            if piece:
                yield piece
        tail = text.end()
        if tail:
            yield tail

    def generate(
        self,
        prompt: str | list[int],
        n_predict: int = -1,
        stream: bool = False,
        ignore_eos: bool = False,
        **sampling,
    ) -> str | Iterator[str]:
        """Continue `prompt` (text, or token ids). Sampling options are the fields of
        `SamplerParams` (temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        pieces = self.stream(ids, sampler_params(**sampling), n_predict, ignore_eos)
        return pieces if stream else "".join(pieces)

    def chat(
        self, messages: list[dict], n_predict: int = -1, stream: bool = False, **sampling
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages` ({"role", "content"} dicts)."""
        pieces = self.stream(self.chat_prompt(messages), sampler_params(**sampling), n_predict)
        return pieces if stream else "".join(pieces)

    # -- reporting -----------------------------------------------------------------------------------
    def memory_plan(self) -> dict:
        plan = self.lm.memory_plan(self.cache)
        if self.spec is not None:
            plan["kv"]["mtp"] = self.spec.drafter.plan()
        return plan

    def stats_dict(self, threads: int | None = None) -> dict:
        s, plan = self.stats, self.memory_plan()
        return {
            "model": str(self.lm.path),
            "arch": self.lm.arch,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "prompt_tok_per_s": s.prompt_tok_per_s,
            "decode_tok_per_s": s.decode_tok_per_s,
            "tokens": list(s.tokens),
            "stop_reason": s.stop_reason,
            "threads": threads,
            "device": self.lm.backend.device.type,
            "memory": {
                "weights_bytes": plan["weights_bytes"],
                "weights_by_type": plan["weights_by_type"],
                "backend_extra_bytes": plan["backend_extra_bytes"],
                "kv": plan["kv"],
            },
            **(
                {"speculative": self.spec.stats.to_dict(s.generated_tokens)}
                if self.spec is not None
                else {}
            ),
            **({"moe_n_expert": self.opts.moe_n_expert} if self.opts.moe_n_expert else {}),
        }


def sampler_params(**sampling) -> SamplerParams:
    known = {f.name for f in fields(SamplerParams)}
    bad = sorted(set(sampling) - known)
    if bad:
        raise LlmkitError(f"unknown sampling option(s) {', '.join(bad)} (known: {sorted(known)})")
    p = SamplerParams(**sampling)
    p.validate()
    return p
