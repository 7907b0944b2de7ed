"""The Python API: a loaded model that generates text, what `llm run` drives as well.

    import llmkit
    lm = llmkit.load("smollm2-135m")                 # a GGUF path or a known model name
    print(lm.generate("The capital of France is", n_predict=16, temp=0))
    for piece in lm.generate("Once upon a time", n_predict=64, stream=True):
        print(piece, end="", flush=True)
    lm = llmkit.load("gemma3-270m", mtp=True, draft=2)   # speculative decoding with MTP heads
    lm.create_completion("Hello", max_tokens=8)      # OpenAI-shaped dicts (core/completions.py)

The object keeps one KV cache: a prompt that starts with what the cache holds (a chat's earlier
turns) evaluates only its new tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmkit.core.completions import Completions, TextStream, sampler_params
from llmkit.core.decode.loop import GenStats, Speculation, generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.model.catalog import resolve_model
from llmkit.core.tokenizer import Tokenizer, load_tokenizer
from llmkit.core.tokenizer.chat import ChatFormat
from llmkit.errors import LlmkitError


@dataclass
class LoadOptions:
    """Everything fixed at load time (llama-cli's model and context flags)."""

    n_ctx: int = 4096  # 0: the model's training context
    n_ubatch: int = 512
    n_threads: int | None = None  # CPU threads (kernels/ops.set_threads); None: as set already
    device: str | None = None  # None: cpu, or cuda when n_gpu_layers asks for a GPU
    n_gpu_layers: int = 0  # llama.cpp's -ngl: != 0 puts the whole model on the GPU (if any)
    use_mmap: bool = True  # False (--no-mmap): read every weight page in at load
    use_mlock: bool = False  # --mlock: lock the weights in RAM
    repack: bool = True  # False (--no-repack): the native kernels read the GGUF rows as stored
    chat_template: str | None = None  # a built-in name (chatml, gemma) or a jinja template
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
    spec: str | None = None  # the drafter: "mtp" (same as mtp=True) or "early-exit"
    n_layer_exit: int = 0  # > 0: the first L trunk layers (alone, or as the early-exit drafter)
    tp: object = None  # a core.distributed Group: load this rank's tensor-parallel shard
    tp_mode: str = "exact"  # how attn_output / ffn_down combine (core/distributed/shard.py)
    layer_split: tuple = ()  # --split-mode layer: (devices, shares) (core/distributed/pipeline)
    runtime: str = "auto"  # "lean": the torch-free CPU runtime (core/lean/), "torch", or either


NO_GPU_NOTE = "no usable GPU found, --gpu-layers option will be ignored"  # llama.cpp's


def pick_device(device: str | None, n_gpu_layers: int) -> tuple[str, str | None]:
    """(device, note): an explicit device wins; -ngl N != 0 means cuda when one is available,
    else CPU with llama.cpp's note."""
    if device is not None:
        return device, None
    if not n_gpu_layers:
        return "cpu", None
    import torch

    if torch.cuda.is_available():
        return "cuda", None
    return "cpu", NO_GPU_NOTE


def pin_weights(lm, use_mmap: bool, use_mlock: bool) -> list[str]:
    """--no-mmap: fault every page of the GGUF the kernels still read in now; --mlock: lock them
    and the weights moved into x8 groups (kernels/cpu_pack.py: the mapping's pages of those are
    not touched again) in RAM (mlock(2)); warnings for what the OS refused."""
    import ctypes
    import ctypes.util
    import mmap

    mm = lm.gguf._mm  # np.memmap of the whole file
    base, page = mm.ctypes.data, mmap.PAGESIZE
    moved = sorted((src.ctypes.data - base, src.ctypes.data - base + src.nbytes)
                   for src, _ in lm.backend.packed if 0 <= src.ctypes.data - base < mm.nbytes)  # fmt: skip
    spans, at = [], 0  # byte ranges of the file still read in place
    for lo, hi in moved:
        lo, hi = (lo + page - 1) // page * page, hi // page * page  # whole pages only
        if lo > at:
            spans.append((at, lo))
        at = max(at, hi)
    if at < mm.nbytes:
        spans.append((at, mm.nbytes))
    warnings = []
    if not use_mmap:
        raw = getattr(mm, "_mmap", None)
        for lo, hi in spans:
            if raw is not None and hasattr(mmap, "MADV_WILLNEED"):
                raw.madvise(mmap.MADV_WILLNEED, lo, hi - lo)
            mm[lo:hi:page].sum()  # touch each page: the reads happen at load, not at decode
    if use_mlock:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        regions = [(base + lo, hi - lo) for lo, hi in spans]
        regions += [(x8.ctypes.data, x8.nbytes) for _, x8 in lm.backend.packed]
        for ptr, n in regions:
            if n and libc.mlock(ctypes.c_void_p(ptr), ctypes.c_size_t(n)) != 0:
                err = ctypes.get_errno()
                warnings.append(
                    f"failed to mlock {n}-byte buffer: {os.strerror(err)} "
                    "(try increasing RLIMIT_MEMLOCK: 'ulimit -l')"
                )
                break
    return warnings


@dataclass
class LLM(Completions):
    lm: object  # LoadedModel (core/models/loader.py) or LeanLoaded (core/lean/load.py)
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
        lean = _load_lean(model, opts)  # the torch-free runtime, when it can run this
        if lean is not None:
            return cls._ready(*lean, opts)
        from llmkit.core.decode.assistant import assistant_spec, is_assistant_file
        from llmkit.core.decode.early_exit import early_exit_spec, exit_layers, spec_type
        from llmkit.core.models.loader import load_model, read_model_file

        kind = spec_type(opts.spec, opts.mtp)
        draft_path = resolve_model(opts.model_draft) if opts.model_draft else None
        if draft_path and kind != "mtp":
            raise LlmkitError("-md/--model-draft is the MTP sidecar: it needs --mtp")
        # a Gemma 4 assistant drafts from its own file; a NextN sidecar loads with the model
        assistant = kind == "mtp" and draft_path is not None and is_assistant_file(draft_path)
        device, note = pick_device(opts.device, opts.n_gpu_layers)
        from llmkit.kernels import native_abi, ops

        if opts.n_threads is not None:  # the CLI sets them itself (-t); a script may ask here
            ops.set_threads(opts.n_threads if opts.n_threads > 0 else (os.cpu_count() or 1))
        elif native_abi.available():  # torch gets one thread beside the native pool (ops)
            ops.set_threads(native_abi.get_threads())
        path, mtp = resolve_model(model), kind == "mtp" and not assistant
        tokenizer, kw = None, {}
        t_load = time.perf_counter()  # llama.cpp's load time: the file, vocabulary and weights
        if opts.tp is None:  # the tokenizer first: its build's transient memory then never
            # stacks on weights already resident (x8 groups are packed at load)
            kw["model_file"] = read_model_file(
                path, mtp, None if assistant else draft_path, opts.moe_n_expert
            )
            tokenizer = load_tokenizer(kw["model_file"].gf.metadata)
        lm = (load_model if opts.tp is None else _tp_loader(opts))(
            path,
            device="cpu" if opts.layer_split else device,  # the split places the blocks
            mtp=mtp,
            draft_path=None if assistant else draft_path,
            moe_n_expert=opts.moe_n_expert,
            repack=opts.repack,
            **kw,
        )
        if opts.layer_split:  # core/distributed/pipeline.py: blocks rebuilt on their devices
            from llmkit.core.distributed.pipeline import split_layers

            lm.model = split_layers(lm, *opts.layer_split)
        warnings = [note] if note else []
        warnings += pin_weights(lm, opts.use_mmap, opts.use_mlock)
        n_ctx = _n_ctx(lm, opts, warnings)
        margin = _margin(opts, spec_cfg)
        exit_at = exit_layers(lm, kind, opts.n_layer_exit)  # core/decode/early_exit.py
        new_cache = lm.new_cache
        if opts.layer_split:
            from llmkit.core.distributed.pipeline import split_cache

            new_cache = lambda *a, **kw: split_cache(lm.model, *a, **kw)  # noqa: E731
        tokenizer = tokenizer or load_tokenizer(lm.metadata)
        lm.load_seconds = time.perf_counter() - t_load  # load_model's own time leaves out the
        # file read and the tokenizer, both done before it here
        cache = new_cache(n_ctx, margin=margin, type_k=opts.type_k, type_v=opts.type_v)
        self = cls(lm, tokenizer, cache, opts, warnings=warnings)
        if opts.chat_template is not None:
            self.set_chat_template(opts.chat_template)
        if kind == "early-exit":
            self.spec = early_exit_spec(lm.model, cache, exit_at, spec_cfg)
        if assistant:
            self.spec = assistant_spec(lm, draft_path, cache, spec_cfg)
        elif kind == "mtp":
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

    @classmethod
    def _ready(cls, lm, tokenizer, opts: LoadOptions) -> LLM:
        """The LLM over a model the torch-free runtime loaded (core/lean/): plain decoding."""
        warnings = [NO_GPU_NOTE] if opts.n_gpu_layers and opts.device is None else []
        warnings += pin_weights(lm, opts.use_mmap, opts.use_mlock)
        n_ctx = _n_ctx(lm, opts, warnings)
        cache = lm.new_cache(n_ctx, _margin(opts, None), opts.type_k, opts.type_v)
        self = cls(lm, tokenizer, cache, opts, warnings=warnings)
        if opts.chat_template is not None:
            self.set_chat_template(opts.chat_template)
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

    def set_chat_template(self, name_or_jinja: str) -> None:
        """llama.cpp's --chat-template: a built-in name or a jinja template string."""
        from llmkit.core.tokenizer.chat import named_chat_template

        self.chat_format.template, self.chat_format.source = named_chat_template(name_or_jinja)

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
        self, ids: list[int], params: SamplerParams, n_predict: int = -1, ignore_eos: bool = False,
        logits_hook=None, grammar: str | None = None,
    ) -> Iterator[int]:  # fmt: skip
        """Token ids after the prompt `ids` (reusing the cached prefix), streamed; `logits_hook`
        sees each sampled position's logits after bias and penalties (plain decoding only).
        Closing the iterator early (a stop string, Ctrl-C) keeps the cache and `history`
        consistent."""
        # the prompt (cached prefix included) is not what presence/frequency penalties count
        n = len(ids)
        base = Sampler(params, n) if logits_hook is None else _Observed(params, logits_hook, n)
        sampler = base
        if self.opts.tp is not None:  # every rank takes rank 0's tokens
            from llmkit.core.distributed.layers import RankSampler

            sampler = base = RankSampler(base, self.opts.tp)
        if grammar is not None:  # core/decode/grammar.py: plain decoding, the mask before sampling
            from llmkit.core.decode.grammar import constrained

            sampler = constrained(
                sampler, self.tokenizer, grammar, self.spec is not None, ignore_eos
            )
        if self.spec is not None:
            if logits_hook is not None:
                raise LlmkitError("logprobs need plain decoding (not --mtp)")
            self.spec.config.check_sampling(sampler.greedy)
        start = self._reuse_prefix(ids)
        base.n_prompt = len(ids) - start  # the loop's history: the evaluated prompt, then output
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
        try:
            for t in gen:
                out.append(t)
                yield t
        except BaseException as e:
            gen.close()
            if not isinstance(e, GeneratorExit):  # stopped mid-forward: the cache is suspect
                self.history = []
                raise
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
        self, ids: list[int], params: SamplerParams, n_predict: int = -1, ignore_eos: bool = False,
        grammar: str | None = None,
    ) -> Iterator[str]:  # fmt: skip
        """Text pieces of the generated tokens, as they become complete UTF-8 (`grammar`: a
        compile_grammar() result the output must follow)."""
        gen = self.generate_ids(ids, params, n_predict, ignore_eos, grammar=grammar)
        text = TextStream(self.tokenizer)
        try:
            for t in gen:
                piece = text.put(t)
                if piece:
                    yield piece
        finally:
            gen.close()
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
            plan["kv"][self.spec.stats.kind] = self.spec.drafter.plan()
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


def _n_ctx(lm, opts: LoadOptions, warnings: list[str]) -> int:
    """-c (0: the model's training context), with llama.cpp's warning past that context."""
    n_ctx = opts.n_ctx or lm.config.n_ctx_train
    if n_ctx > lm.config.n_ctx_train:
        warnings.append(f"-c {n_ctx} exceeds the model's training context {lm.config.n_ctx_train}")
    return n_ctx


def _margin(opts: LoadOptions, spec_cfg: SpecConfig | None) -> int:
    """The KV ring margin: it must hold a prompt chunk and a whole verify batch (rollback)."""
    return max(opts.n_ubatch, 64, spec_cfg.verify_rows if spec_cfg is not None else 1)


def _load_lean(model, opts: LoadOptions):
    """(LeanLoaded, tokenizer) when the torch-free runtime can run the model with these options
    (core/lean/load.py), else None (the torch model loads instead)."""
    from llmkit.core.lean.load import lean_file, lean_options, load_lean

    if opts.runtime not in ("auto", "lean", "torch"):
        raise LlmkitError(f"runtime must be auto, lean or torch, got {opts.runtime!r}")
    forced = opts.runtime == "lean"
    if opts.runtime == "torch" or not (lean_options(opts) or forced):
        return None
    if not lean_options(opts):
        raise LlmkitError("the torch-free runtime runs plain decoding on a CPU with the native "
                          "kernels and f16/f32/bf16/q8_0/q4_0 KV only")  # fmt: skip
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.kernels import native_abi

    t0 = time.perf_counter()  # llama.cpp's load time: the file, vocabulary and weights
    gf = GGUFFile(resolve_model(model))
    got = lean_file(gf)
    if got is None:
        if forced:
            raise LlmkitError(f"the torch-free runtime cannot run {gf.path} (architectures "
                              "llama, gemma3 without NextN blocks or a logit soft-cap)")  # fmt: skip
        return None
    if opts.n_threads is not None:
        native_abi.set_threads(opts.n_threads if opts.n_threads > 0 else (os.cpu_count() or 1))
    tokenizer = load_tokenizer(gf.metadata)  # first: its transient memory never stacks on weights
    lm = load_lean(gf, *got, max(1, opts.n_ubatch), opts.repack, t0)
    return lm, tokenizer


class _Observed(Sampler):
    """A Sampler that shows each sampled position's logits (after bias and penalties, what
    log-probabilities report) to a hook first."""

    def __init__(self, params: SamplerParams, hook, n_prompt: int = 0):
        super().__init__(params, n_prompt)
        self.hook = hook

    def sample(self, logits, history=()) -> int:
        adjusted = self.adjust(logits, history)
        self.hook(adjusted)
        return self.choose(adjusted)

    __call__ = sample


def _tp_loader(opts: LoadOptions):
    """load_model for one tensor-parallel rank: every rank loads, and fails together."""
    from llmkit.core.distributed.load import load_shard

    return lambda *a, **kw: opts.tp.agree(lambda: load_shard(opts.tp, *a, mode=opts.tp_mode, **kw))
