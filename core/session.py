"""One model session for the CLI: load, tokenize, generate with streaming, chat turns, report.

The CLI stays thin: `llm run` builds `RunOptions`, opens a `Runner` and calls `complete` or `chat`.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.core.decode.loop import GenStats, generate
from llmkit.core.decode.sampling import SamplerParams, make_sampler
from llmkit.core.tokenizer.chat import chat_template, render_chat
from llmkit.errors import LlmkitError


@dataclass
class RunOptions:
    model: str | None = None
    n_ctx: int = 4096
    n_ubatch: int = 512
    device: str = "cpu"
    threads: int = 1
    verbose: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    # speculative decoding with the model's NextN (MTP) blocks
    mtp: bool = False
    model_draft: str | None = None  # MTP-only sidecar GGUF
    draft: int = 3
    draft_p_min: float = 0.0
    draft_branches: int = 1  # > 1: draft trees (greedy only)
    type_k_draft: str = "f16"
    type_v_draft: str = "f16"
    moe_n_expert: int | None = None


def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class TextStream:
    """Turns token ids into text as they arrive; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out = tokenizer, out or sys.stdout
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text: list[str] = []

    def put(self, token: int) -> None:
        s = self.dec.decode(self.tok.token_to_piece(token))
        if s:
            self.text.append(s)
            self.out.write(s)
            self.out.flush()

    def end(self) -> str:
        s = self.dec.decode(b"", final=True)
        if s:
            self.text.append(s)
            self.out.write(s)
        self.out.flush()
        return "".join(self.text)


@dataclass
class Runner:
    lm: object  # LoadedModel
    tokenizer: object
    cache: object  # KVCache
    opts: RunOptions
    stats: GenStats = field(default_factory=GenStats)
    history: list[int] = field(default_factory=list)  # tokens whose K/V the cache holds
    mtp: object | None = None  # MTPContext when speculative decoding is on
    spec: object | None = None  # SpecStats

    @classmethod
    def open(cls, opts: RunOptions) -> Runner:
        from llmkit.core.model.catalog import resolve_model
        from llmkit.core.model.loader import load_model
        from llmkit.core.tokenizer import load_tokenizer

        path = resolve_model(opts.model)
        draft_path = resolve_model(opts.model_draft) if opts.model_draft else None
        if draft_path and not opts.mtp:
            raise LlmkitError("-md/--model-draft is the MTP sidecar: it needs --mtp")
        lm = load_model(
            path,
            device=opts.device,
            mtp=opts.mtp,
            draft_path=draft_path,
            moe_n_expert=opts.moe_n_expert,
        )
        tok = load_tokenizer(lm.metadata)
        n_ctx = opts.n_ctx or lm.config.n_ctx_train
        if n_ctx > lm.config.n_ctx_train:
            _eprint(
                f"warning: -c {n_ctx} exceeds the model's training context {lm.config.n_ctx_train}"
            )
        # the ring margin must hold a prompt chunk and a whole verify batch (rollback safety)
        margin = max(opts.n_ubatch, 64, opts.draft + 1)
        cache = lm.new_cache(n_ctx, margin=margin, type_k=opts.type_k, type_v=opts.type_v)
        runner = cls(lm, tok, cache, opts)
        if opts.mtp:
            from llmkit.core.decode.drafter import MTPContext
            from llmkit.core.decode.speculative import SpecStats

            heads = lm.model.n_mtp_heads
            limit = heads if heads > 1 else 16
            if not 1 <= opts.draft <= limit:
                why = (
                    f"the model's {heads} chained NextN blocks"
                    if heads > 1
                    else "16 (verify batch limit)"
                )
                raise LlmkitError(
                    f"--draft must be between 1 and {limit} ({why}), got {opts.draft}"
                )
            runner.mtp = MTPContext(
                lm.model,
                n_ctx,
                margin,
                opts.type_k_draft,
                opts.type_v_draft,
                device=lm.backend.device,
            )
            runner.spec = SpecStats(draft_max=opts.draft)
        return runner

    # -- generation -------------------------------------------------------------------------
    def _generate(
        self,
        ids: list[int],
        params: SamplerParams,
        n_predict: int,
        ignore_eos: bool,
        stream: TextStream,
    ) -> list[int]:
        # reuse the cached prefix (chat turns), evaluate only what is new
        common = 0
        for a, b in zip(self.history, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always evaluate at least one token for fresh logits
        # with MTP, re-evaluate one more token: its hidden state pairs with the first new MTP row
        start = max(0, common - 1) if self.mtp else common
        try:
            self.cache.truncate(start)
            if self.mtp:
                self.mtp.truncate(common)
        except LlmkitError:  # a sliding ring already overwrote what the shorter prefix needs
            self.cache.clear()
            if self.mtp:
                self.mtp.truncate(0)
            start = 0
        self.history = self.history[:start]
        m, o = self.lm.model, self.opts
        if self.mtp:
            from llmkit.core.decode.speculative import speculative_generate

            gen = speculative_generate(
                m,
                self.cache,
                self.mtp,
                ids[start:],
                params,
                self.spec,
                n_predict,
                self.tokenizer.is_eog,
                ignore_eos,
                self.stats,
                o.draft_p_min,
                o.n_ubatch,
                o.draft_branches,
            )
        else:
            gen = generate(
                m,
                self.cache,
                ids[start:],
                make_sampler(params),
                n_predict,
                self.tokenizer.is_eog,
                ignore_eos,
                self.stats,
                o.n_ubatch,
            )
        out = []
        for t in gen:
            out.append(t)
            stream.put(t)
        self.history = ids + out
        if self.cache.n_past < len(self.history):  # the last token was sampled, not evaluated
            self.history = self.history[: self.cache.n_past]
        return out

    def complete(
        self,
        text: str,
        params: SamplerParams,
        n_predict: int,
        ignore_eos: bool,
        echo_prompt: bool = True,
    ) -> str:
        ids = self.tokenizer.encode(text, add_special=True, parse_special=True)
        if echo_prompt:
            sys.stdout.write(text)
            sys.stdout.flush()
        stream = TextStream(self.tokenizer)
        self._generate(ids, params, n_predict, ignore_eos, stream)
        out = stream.end()
        sys.stdout.write("\n")
        return out

    def chat(
        self,
        first: str | None,
        system: str | None,
        params: SamplerParams,
        n_predict: int,
        ignore_eos: bool,
    ) -> None:
        template, source = chat_template(self.lm.metadata, self.lm.arch)
        if self.opts.verbose:
            _eprint(f"chat template: {source}")
        tok = self.tokenizer
        bos = tok.id_to_text(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.id_to_text(tok.eos_id) if tok.eos_id is not None else ""
        messages = [{"role": "system", "content": system}] if system else []
        interactive = sys.stdin.isatty()
        pending = first
        while True:
            if pending is None:
                if interactive:
                    sys.stdout.write("\n> ")
                    sys.stdout.flush()
                line = sys.stdin.readline()
                if not line:
                    break
                pending = line.rstrip("\n")
                if pending.strip() in ("/exit", "/quit"):
                    break
                if not pending.strip():
                    pending = None
                    continue
            messages.append({"role": "user", "content": pending})
            pending = None
            text = render_chat(template, messages, bos, eos, add_generation_prompt=True)
            ids = tok.encode(text, add_special=True, parse_special=True)
            if len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
                ids = ids[1:]  # the template already wrote BOS
            stream = TextStream(tok)
            self._generate(ids, params, n_predict, ignore_eos, stream)
            messages.append({"role": "assistant", "content": stream.end()})
            sys.stdout.write("\n")
            sys.stdout.flush()

    # -- reporting --------------------------------------------------------------------------
    def memory_plan(self) -> dict:
        plan = self.lm.memory_plan(self.cache)
        if self.mtp is not None:
            plan["kv"]["mtp"] = self.mtp.plan()
        return plan

    def print_plan(self) -> None:
        lm, plan = self.lm, self.memory_plan()
        _eprint(
            f"model: {lm.path} ({lm.describe()}, {lm.n_params() / 1e6:.2f} M params, "
            f"loaded in {lm.load_seconds:.2f} s)"
        )
        _eprint(f"weights: {plan['weights_bytes'] / 2**20:.2f} MiB in the GGUF (mmapped)")
        for t, v in plan["weights_by_type"].items():
            _eprint(f"  {t:<7} {v['tensors']:4d} tensors {v['bytes'] / 2**20:9.2f} MiB")
        _eprint(
            f"backend: {lm.backend.device.type}, weights prepared as {plan['backend_weight_dtype']}: "
            f"{plan['backend_extra_bytes'] / 2**20:.2f} MiB"
        )
        for ctx, kv in plan["kv"].items():
            _eprint(
                f"kv cache ({ctx}): {kv['bytes'] / 2**20:.2f} MiB, layers {kv['layers']}, "
                f"K {kv['type_k']}, V {kv['type_v']}, n_ctx {self.cache.n_ctx}"
            )
            for name, g in kv["groups"].items():
                kind = "full attention" if g["window"] is None else f"sliding window {g['window']}"
                _eprint(
                    f"  {name:<12} {len(g['layers']):3d} layers x {g['cells']} cells ({kind}): "
                    f"{g['bytes'] / 2**20:.2f} MiB"
                )

    def print_timings(self) -> None:
        s = self.stats
        pe_ms, ev_ms = s.prompt_seconds * 1e3, s.decode_seconds * 1e3
        n_ev = s.decode_steps
        _eprint()
        _eprint(f"llmkit: load time = {self.lm.load_seconds * 1e3:10.2f} ms")
        _eprint(
            f"llmkit: prompt eval time = {pe_ms:10.2f} ms / {s.prompt_tokens:5d} tokens "
            f"({pe_ms / max(1, s.prompt_tokens):8.2f} ms per token, {s.prompt_tok_per_s:8.2f} tokens per second)"
        )
        _eprint(
            f"llmkit:        eval time = {ev_ms:10.2f} ms / {n_ev:5d} runs   "
            f"({ev_ms / max(1, s.decode_tokens):8.2f} ms per token, {s.decode_tok_per_s:8.2f} tokens per second)"
        )
        if s.stop_reason:
            _eprint(f"llmkit: stop: {s.stop_reason}")
        if self.spec is not None:
            d = self.spec.to_dict(s)
            per_pos = ", ".join(f"{a:.2f}" for a in d["acceptance_per_position"])
            _eprint(
                f"llmkit: speculative (mtp, draft {d['draft_max']}): {d['drafts']} drafts, "
                f"{d['accepted_tokens']}/{d['draft_tokens']} draft tokens accepted "
                f"({d['acceptance_rate']:.3f}), per position [{per_pos}], "
                f"mean accepted length {d['mean_accepted_length']:.2f}"
            )
            _eprint(
                f"llmkit: speculative decode {d['decode_tok_per_s']:.2f} tok/s "
                f"({d['decode_tok_per_s_without_drafting']:.2f} tok/s without drafting time, "
                f"drafting {d['draft_seconds'] * 1e3:.1f} ms)"
            )

    def stats_dict(self) -> dict:
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
            "threads": self.opts.threads,
            "device": self.lm.backend.device.type,
            "memory": {
                "weights_bytes": plan["weights_bytes"],
                "weights_by_type": plan["weights_by_type"],
                "backend_extra_bytes": plan["backend_extra_bytes"],
                "kv": plan["kv"],
            },
            **({"speculative": self.spec.to_dict(s)} if self.spec is not None else {}),
            **({"moe_n_expert": self.opts.moe_n_expert} if self.opts.moe_n_expert else {}),
        }

    def write_stats(self, path: Path) -> None:
        write_json_atomic(Path(path), self.stats_dict())


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file beside the target, then rename: never a partly written file."""
    path = path.expanduser()
    if not path.parent.exists():
        raise LlmkitError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
