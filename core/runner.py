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

from llmkit.core.chat import chat_template, render_chat
from llmkit.core.errors import LlmkitError
from llmkit.core.generate import GenStats, generate
from llmkit.core.sampling import SamplerParams, make_sampler


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

    @classmethod
    def open(cls, opts: RunOptions) -> Runner:
        from llmkit.core.model import load_model
        from llmkit.core.model_cache import resolve_model
        from llmkit.core.tokenizer import load_tokenizer

        path = resolve_model(opts.model)
        lm = load_model(path, device=opts.device)
        tok = load_tokenizer(lm.metadata)
        n_ctx = opts.n_ctx or lm.config.n_ctx_train
        if n_ctx > lm.config.n_ctx_train:
            _eprint(
                f"warning: -c {n_ctx} exceeds the model's training context {lm.config.n_ctx_train}"
            )
        cache = lm.new_cache(
            n_ctx, margin=max(opts.n_ubatch, 64), type_k=opts.type_k, type_v=opts.type_v
        )
        return cls(lm, tok, cache, opts)

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
        try:
            self.cache.truncate(common)
        except LlmkitError:  # a sliding ring already overwrote what the shorter prefix needs
            self.cache.clear()
            common = 0
        self.history = self.history[:common]
        sample = make_sampler(params)
        out = []
        gen = generate(
            self.lm.model,
            self.cache,
            ids[common:],
            sample,
            n_predict,
            self.tokenizer.is_eog,
            ignore_eos,
            self.stats,
            self.opts.n_ubatch,
        )
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
    def print_plan(self) -> None:
        lm, plan = self.lm, self.lm.memory_plan(self.cache)
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
        kv = plan["kv"]["main"]
        _eprint(
            f"kv cache (main): {kv['bytes'] / 2**20:.2f} MiB, K {kv['type_k']}, V {kv['type_v']}, "
            f"n_ctx {self.cache.n_ctx}"
        )
        for name, g in kv["groups"].items():
            kind = "full attention" if g["window"] is None else f"sliding window {g['window']}"
            _eprint(
                f"  {name:<8} {len(g['layers']):3d} layers x {g['cells']} cells ({kind}): "
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
            f"({ev_ms / max(1, n_ev):8.2f} ms per token, {s.decode_tok_per_s:8.2f} tokens per second)"
        )
        if s.stop_reason:
            _eprint(f"llmkit: stop: {s.stop_reason}")

    def stats_dict(self) -> dict:
        s, plan = self.stats, self.lm.memory_plan(self.cache)
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
