"""`llm bench`: llama-bench style measurements of prompt processing (pp) and generation (tg), with
thread, ubatch, depth, KV-type, MTP and early-exit sweeps. Parameters live in core/bench/params.py, formatting in core/bench/report.py.

Protocol (llama-bench's, ARCH_SPEC §8.1): every (model, settings, test) instance runs one untimed
warm-up (unless disabled), then `reps` repetitions, each on a new KV cache; the `depth` context is
evaluated before the clock starts, and the device is synchronised before every clock read.
  * pp<N>: one prompt of N random tokens (BOS first) evaluated in n_ubatch chunks.
  * tg<N>: N single-token decode steps on random tokens, as llama-bench does.
  * tg<N> on real text: draft acceptance on random tokens means nothing, so when the sweep holds
    an MTP or early-exit run (or a prompt file is given) every tg row, the plain baselines included,
    generates N
    tokens greedily after a real-text prompt: repetition r uses prompt r mod P of the built-in set
    (or of --prompt-file's paragraphs), preceded by `depth` tokens of the same text. The clock covers
    the decode loop after the prompt's first token: forward passes, the greedy pick and, with MTP,
    drafting and verification. pp rows always use random tokens and never draft. A drafted row's
    tokens are compared with its plain baseline's, repetition by repetition (`lossless`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import torch

from llmkit.core.bench.params import (
    BUILTIN_PROMPTS,
    WARMUP_TG_TOKENS,
    BenchParams,
    Instance,
    plan,
    rows,
)
from llmkit.core.bench.report import make_record, set_lossless, set_speedups
from llmkit.core.decode.drafter import SINGLE_HEAD_MAX_DRAFT
from llmkit.core.decode.early_exit import MAX_DRAFT, check_exit, default_exit
from llmkit.errors import LlmkitError
from llmkit.kernels import ops


def check_mtp(path: Path, drafts: list[int], draft_path: Path | None = None) -> None:
    """Fail before any measurement when the model has no NextN blocks (nor a -md drafter) or a
    draft is too long."""
    from llmkit.core.decode.assistant import is_assistant_file
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.core.model.sidecar import shipped_head

    gf = GGUFFile(path)
    arch = gf.architecture
    if draft_path is not None and is_assistant_file(draft_path):
        if arch != "gemma4":
            raise LlmkitError(f"-md {draft_path}: a gemma4-assistant drafts for gemma4 models only")
        if max(drafts) > SINGLE_HEAD_MAX_DRAFT:
            raise LlmkitError(f"--draft must be between 1 and {SINGLE_HEAD_MAX_DRAFT} with -md")
        return
    if draft_path is not None:  # a NextN sidecar
        gf = GGUFFile(draft_path)
    heads = int(gf.metadata.get(f"{arch}.nextn_predict_layers", 0))
    if heads == 0:  # a head shipped for this model (`llm mtp-train`)
        head = shipped_head(gf)
        heads = int(GGUFFile(head).metadata[f"{arch}.nextn_predict_layers"]) if head else 0
    if heads == 0:
        raise LlmkitError(f"--mtp 1: {path} has no NextN (MTP) blocks (nextn_predict_layers is 0)")
    limit = heads if heads > 1 else SINGLE_HEAD_MAX_DRAFT
    if max(drafts) > limit:
        why = f"its {heads} chained NextN blocks" if heads > 1 else "the verify batch limit"
        raise LlmkitError(f"--draft must be between 1 and {limit} for {path} ({why})")


def check_early_exit(path: Path, layers: list[int], drafts: list[int]) -> None:
    """Fail before any measurement when an exit layer does not fit the model (0: its default)
    or a draft is longer than an early-exit drafter takes."""
    from llmkit.core.models.loader import read_model_file

    mf = read_model_file(path)
    n = mf.config.n_layer
    for L in layers:
        check_exit(L or default_exit(mf.arch, n), n, drafting=True)
    if max(drafts) > MAX_DRAFT:
        raise LlmkitError(
            f"--draft must be between 1 and {MAX_DRAFT} for --spec early-exit "
            f"({MAX_DRAFT} sequential early-exit passes), got {max(drafts)}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


class Session:
    """One loaded model (with or without its NextN blocks): runs its tests."""

    def __init__(self, lm, tokenizer, prompts: list[str], assistant=None):
        self.lm, self.model, self.device = lm, lm.model, lm.backend.device
        self.assistant = assistant  # the -md gemma4 assistant of MTP rows (else NextN heads)
        self.bos = tokenizer.bos_id if tokenizer.add_bos else None
        self.n_vocab = lm.config.n_vocab
        self.texts = [tokenizer.encode(t, add_special=False, parse_special=False) for t in prompts]
        self.filler = [t for ids in self.texts for t in ids]  # depth context for real-text runs

    def check_kv(self, type_k: str, type_v: str) -> None:
        """A cache type the model cannot store (q-types need head dims divisible by 32) fails
        here, before its group measures anything."""
        self.lm.new_cache(1, margin=1, type_k=type_k, type_v=type_v)

    def exit_layer(self, inst: Instance) -> int | None:
        """An early-exit row's exit layer (its 0 resolved to the model's default)."""
        if inst.exit_layer is None:
            return None
        return inst.exit_layer or default_exit(self.lm.arch, self.lm.config.n_layer)

    def check_spec(self, inst: Instance) -> None:
        """An early-exit row's settings against the loaded model and its cache (draft length,
        draft trees on this attention kernel), before its group measures anything."""
        if inst.exit_layer is not None:
            self._early_exit(inst, self._cache(inst, 8)[0])

    def _early_exit(self, inst: Instance, cache):
        from llmkit.core.decode.early_exit import early_exit_spec

        return early_exit_spec(self.model, cache, self.exit_layer(inst), self._spec_config(inst))

    def _cache(self, inst: Instance, n_ctx: int):
        # ring margin: a prompt chunk and a whole verify batch (the rule of `llm run`)
        margin = max(inst.n_ubatch, 64, self._spec_config(inst).verify_rows)
        return self.lm.new_cache(n_ctx + 1, margin, inst.type_k, inst.type_v), margin

    @staticmethod
    def _spec_config(inst: Instance):
        from llmkit.core.decode.speculative import SpecConfig

        return SpecConfig(inst.draft or 0, inst.p_min, inst.branches if inst.spec else 0)

    def _random(self, n: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.n_vocab, (n,), generator=g).tolist()
        if self.bos is not None and ids:
            ids[0] = self.bos  # llama-bench: BOS first when the model adds one
        return ids

    def _fill(self, cache, inst: Instance, seed: int) -> None:
        from llmkit.core.decode.loop import prefill

        if inst.depth:
            prefill(self.model, cache, self._random(inst.depth, seed), inst.n_ubatch)

    def _pp(self, inst: Instance, n: int, seed: int) -> int:
        from llmkit.core.decode.loop import prefill

        cache, _ = self._cache(inst, inst.depth + n)
        self._fill(cache, inst, seed + 1)
        ids = self._random(n, seed)
        _sync(self.device)
        t0 = time.perf_counter_ns()
        prefill(self.model, cache, ids, inst.n_ubatch)
        _sync(self.device)
        return time.perf_counter_ns() - t0

    def _tg_random(self, inst: Instance, n: int, seed: int) -> int:
        cache, _ = self._cache(inst, inst.depth + n)
        self._fill(cache, inst, seed + 1)
        ids = torch.tensor(self._random(n, seed))
        _sync(self.device)
        t0 = time.perf_counter_ns()
        for i in range(n):
            self.model.forward(ids[i : i + 1], cache, logits="last")
        _sync(self.device)
        return time.perf_counter_ns() - t0

    def text_context(self, rep: int, depth: int) -> list[int]:
        """BOS, `depth` tokens of the prompt set's text, then prompt rep mod P."""
        head = [self.bos] if self.bos is not None else []
        if depth > len(head):
            cycle = itertools.islice(itertools.cycle(self.filler), depth - len(head))
            head += list(cycle)
        return head + self.texts[rep % len(self.texts)]

    def _tg_text(self, inst: Instance, n: int, rep: int):
        from llmkit.core.decode.loop import Speculation, generate
        from llmkit.core.decode.sampling import Sampler, SamplerParams

        ids = self.text_context(rep, inst.depth)
        cache, margin = self._cache(inst, len(ids) + n + (inst.draft or 0))
        spec = None
        if inst.mtp:
            from llmkit.core.decode.assistant import AssistantDrafter
            from llmkit.core.decode.drafter import MTPDrafter
            from llmkit.core.decode.speculative import SpecStats

            drafter = (
                AssistantDrafter(self.assistant, cache)
                if self.assistant is not None
                else MTPDrafter(
                    self.model.mtp, cache.n_ctx, margin, inst.type_k, inst.type_v, self.device
                )
            )
            cfg = self._spec_config(inst)
            spec = Speculation(drafter, cfg, SpecStats(cfg.draft, branches=cfg.branches))
        elif inst.exit_layer is not None:
            spec = self._early_exit(inst, cache)
        gen = generate(
            self.model, cache, ids, Sampler(SamplerParams(temp=0)), n + 1,
            ignore_eos=True, n_ubatch=inst.n_ubatch, spec=spec,
        )  # fmt: skip
        out = [next(gen)]  # the prompt and its first token: not timed
        _sync(self.device)
        t0 = time.perf_counter_ns()
        out += gen
        _sync(self.device)
        return time.perf_counter_ns() - t0, spec.stats if spec is not None else None, out

    def run_once(self, inst: Instance, n: int, rep: int, text: bool):
        """One timed run of `n` tokens: (nanoseconds, SpecStats or None, the generated tokens
        of a real-text tg run or None)."""
        with torch.inference_mode():
            if inst.kind == "pp":
                return self._pp(inst, n, seed=2 * rep), None, None
            if text:
                return self._tg_text(inst, n, rep)
            return self._tg_random(inst, n, seed=2 * rep), None, None


def merge_spec(total, spec):
    """Sum one repetition's draft counters into `total` (a SpecStats or None)."""
    if spec is None:
        return total
    if total is None:
        return spec
    total.drafts += spec.drafts
    total.draft_tokens += spec.draft_tokens
    total.accepted_tokens += spec.accepted_tokens
    total.accepted_per_position = [
        a + b for a, b in zip(total.accepted_per_position, spec.accepted_per_position)
    ]
    return total


class Progress:
    """What a bench reports while it works (the CLI draws it on stderr); silent by default."""

    def begin(self, total_runs: int) -> None: ...

    def status(self, desc: str) -> None: ...  # e.g. loading a model

    def run(self, desc: str) -> None: ...  # a run (warm-up or repetition) starts

    def finished(self, record: dict) -> None: ...  # an instance's record is complete


def measure(session: Session, inst: Instance, p: BenchParams, progress: Progress):
    """Warm-up (unless disabled) and `p.reps` timed runs: (samples in ns, summed SpecStats,
    each repetition's generated tokens or None, the paired plain runs' ns or None)."""
    ops.set_threads(inst.threads)
    name = f"{session.lm.describe()} {inst.test}" + (
        (" mtp" if inst.mtp else f" early-exit L{session.exit_layer(inst)}")
        + f" draft {inst.draft}"
        + (f" p_min {inst.p_min:g}" if inst.p_min else "")
        + (f" branches {inst.branches}" if inst.branches > 1 else "")
        if inst.spec
        else ""
    )
    text = p.text_gen and inst.kind == "tg"
    if p.warmup:
        progress.run(f"{name} warm-up")
        n_warm = inst.n if inst.kind == "pp" else min(inst.n, WARMUP_TG_TOKENS)
        session.run_once(inst, n_warm, 0, text)
    # a drafted text row also times plain decoding of the same prompt right before each of its
    # repetitions, on the same load: a speedup from interleaved runs (speedup_paired) that the
    # machine's drift between rows (minutes apart, another load) cannot move
    plain = (
        dataclasses.replace(inst, mtp=0, draft=None, p_min=0.0, branches=1, exit_layer=None)
        if inst.spec and text
        else None
    )
    samples, spec, outputs, paired = [], None, [], []
    for r in range(p.reps):
        progress.run(f"{name} rep {r + 1}/{p.reps}")
        if plain is not None:
            paired.append(session.run_once(plain, inst.n, r, text)[0])
        ns, s, out = session.run_once(inst, inst.n, r, text)
        samples.append(ns)
        spec = merge_spec(spec, s)
        outputs.append(out)
    return samples, spec, outputs, paired or None


def run_bench(p: BenchParams, paths: list[Path], env: dict, progress: Progress | None = None):
    """Measure every instance of `plan(p)`; return one record per instance in table order."""
    from llmkit.core.decode.assistant import is_assistant_file
    from llmkit.core.lean.load import load_if_lean
    from llmkit.core.models.gemma4_assistant import load_assistant
    from llmkit.core.models.loader import load_model
    from llmkit.core.tokenizer import load_tokenizer

    progress = progress or Progress()
    instances = plan(p)
    progress.begin(len(instances) * (p.reps + p.warmup))
    prompts = list(p.prompts or BUILTIN_PROMPTS)
    done: dict[Instance, dict] = {}
    outputs: dict[Instance, list] = {}
    threads = torch.get_num_threads()  # -t sweeps set torch's global pool: put it back after
    try:
        for (mi, mtp), group in itertools.groupby(instances, key=lambda i: (i.model_idx, i.mtp)):
            progress.status(f"loading {p.models[mi]}" + (" with its NextN blocks" if mtp else ""))
            draft = p.model_draft if mtp else None
            asst = draft is not None and is_assistant_file(draft)
            group = list(group)
            lm = None
            if not mtp and p.device in (None, "cpu") and all(i.exit_layer is None for i in group):
                # what `llm run` runs: the torch-free runtime where it can (core/lean/)
                lm = load_if_lean(paths[mi], max(i.n_ubatch for i in group))
            lm = lm or load_model(
                paths[mi], device=p.device, mtp=bool(mtp) and not asst,
                draft_path=None if asst else draft,
            )  # fmt: skip
            assistant = load_assistant(draft, lm.model) if asst else None
            session = Session(lm, load_tokenizer(lm.metadata), prompts, assistant)
            for tk, tv in {(i.type_k, i.type_v) for i in group}:
                session.check_kv(tk, tv)
            for inst in group:
                session.check_spec(inst)
            for inst in group:
                samples, spec, outputs[inst], paired = measure(session, inst, p, progress)
                done[inst] = make_record(
                    p, inst, lm, paths[mi], samples, spec, env, session.exit_layer(inst), paired
                )
                progress.finished(done[inst])
            del session, lm  # free this load's weights before the next group's
    finally:
        torch.set_num_threads(threads)
    table = [i for i in rows(p) if i in done]
    records = [done[i] for i in table]
    set_speedups(table, records)
    set_lossless(table, records, [outputs[i] for i in table])
    return records
