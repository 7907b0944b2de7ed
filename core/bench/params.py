"""`llm bench` parameters: the swept values, the table rows they expand to and the built-in
prompts. Measuring lives in core/bench/runner.py, formatting in core/bench/report.py."""

from __future__ import annotations

import itertools
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.core.cache.kv import KV_TYPES
from llmkit.errors import LlmkitError

# A few short English prose and chat-style prompts: greedy continuations of real text give the
# draft something to predict (acceptance on random tokens is meaningless).
BUILTIN_PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined movable metal type with an oil-based ink and",
    "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who "
    "every evening climbed the stairs to light the lamp. One stormy night,",
    "User: Can you explain why the sky is blue, in simple words?\nAssistant: Sure! Sunlight is "
    "made of many colours. When it passes through the air,",
    "User: Write a short, friendly email asking a colleague to move our meeting to Friday.\n"
    "Assistant: Hi Sam,\n\nI hope your week is going well. Would it be possible",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make their own food. It takes place mainly in the leaves, where",
)
KV_TYPE_NAMES = tuple(KV_TYPES)
WARMUP_TG_TOKENS = 8  # enough decode steps to touch every kernel once
BANDWIDTH_BASIS = (
    "backend.linear_bytes (weight bytes the matmuls read per token) x t/s, as gpt-fast prints it"
)


@dataclass
class BenchParams:
    """Every swept value list of one `llm bench` call (comma lists parsed by the CLI)."""

    models: list[str]
    n_prompt: list[int] = field(default_factory=lambda: [512])
    n_gen: list[int] = field(default_factory=lambda: [128])
    n_depth: list[int] = field(default_factory=lambda: [0])
    reps: int = 5
    threads: list[int] = field(default_factory=lambda: [os.cpu_count() or 1])
    n_ubatch: list[int] = field(default_factory=lambda: [512])
    type_k: list[str] = field(default_factory=lambda: ["f16"])
    type_v: list[str] = field(default_factory=lambda: ["f16"])
    mtp: list[int] = field(default_factory=lambda: [0])
    draft: list[int] = field(default_factory=lambda: [3])
    p_min: list[float] = field(default_factory=lambda: [0.0])  # --draft-p-min values
    branches: list[int] = field(default_factory=lambda: [1])  # --draft-branches values
    # --spec early-exit: the exit layers L of its rows (empty: no early-exit rows; 0: the model's
    # default exit, as `llm run --spec early-exit` without --n-layer-exit)
    n_layer_exit: list[int] = field(default_factory=list)
    model_draft: str | None = None  # -md: a gemma4-assistant drafter or a NextN sidecar (MTP rows)
    device: str = "cpu"
    warmup: bool = True
    prompts: list[str] | None = None  # real-text prompts (None: the built-in set)
    prompt_file: str | None = None

    @property
    def text_gen(self) -> bool:
        """tg rows generate from real text (an MTP or early-exit sweep, or a prompt file)."""
        return self.speculative or self.prompt_file is not None

    @property
    def speculative(self) -> bool:
        """The sweep holds drafted rows (MTP or early exit)."""
        return 1 in self.mtp or bool(self.n_layer_exit)

    @property
    def gen_input(self) -> str:
        if not self.text_gen:
            return "random"
        return "file" if self.prompt_file else "builtin"

    def validate(self) -> None:
        def check(flag: str, values: list[int], low: int) -> None:
            if not values:
                raise LlmkitError(f"{flag}: no value given")
            bad = [v for v in values if v < low]
            if bad:
                raise LlmkitError(f"{flag} values must be >= {low}, got {bad[0]}")

        if not self.models:
            raise LlmkitError("no model given (-m)")
        for flag, values, low in (
            ("-p", self.n_prompt, 0),
            ("-n", self.n_gen, 0),
            ("-d", self.n_depth, 0),
            ("-t", self.threads, 1),
            ("-ub", self.n_ubatch, 1),
            ("--draft", self.draft, 1),
            ("--draft-branches", self.branches, 1),
        ):
            check(flag, values, low)
        if self.n_layer_exit:
            check("--n-layer-exit", self.n_layer_exit, 0)
        if self.reps < 1:
            raise LlmkitError(f"-r must be >= 1, got {self.reps}")
        if not any(self.n_prompt) and not any(self.n_gen):
            raise LlmkitError("nothing to measure: every -p and -n value is 0")
        for flag, kinds in (("-ctk", self.type_k), ("-ctv", self.type_v)):
            for k in kinds:
                if k not in KV_TYPE_NAMES:
                    raise LlmkitError(
                        f"{flag}: unknown cache type {k!r} (use {', '.join(KV_TYPE_NAMES)})"
                    )
        if not self.p_min or any(not 0.0 <= v <= 1.0 for v in self.p_min):
            raise LlmkitError(f"--draft-p-min values must be in [0, 1], got {self.p_min}")
        if any(m not in (0, 1) for m in self.mtp):
            raise LlmkitError(f"--mtp values must be 0 or 1, got {self.mtp}")
        if self.device not in ("cpu", "cuda"):
            raise LlmkitError(f"unknown device {self.device!r} (use cpu or cuda)")


@dataclass(frozen=True)
class Instance:
    """One table row: a model, its settings and one test."""

    model_idx: int
    threads: int
    n_ubatch: int
    type_k: str
    type_v: str
    depth: int
    kind: str  # "pp" | "tg"
    n: int
    mtp: int = 0
    draft: int | None = None  # draft tokens per round (MTP rows only)
    p_min: float = 0.0  # stop drafting below this draft probability (MTP rows only)
    branches: int = 1  # candidates verified at the first draft position (MTP rows only)
    exit_layer: int | None = None  # early-exit rows: the exit layer L (0: the model's default)

    @property
    def spec(self) -> str | None:
        """The drafter of a row: "mtp", "early-exit" or None (plain decoding)."""
        if self.mtp:
            return "mtp"
        return "early-exit" if self.exit_layer is not None else None

    @property
    def test(self) -> str:
        return f"{self.kind}{self.n}" + (f" @ d{self.depth}" if self.depth else "")

    def baseline_key(self) -> tuple:
        """What a drafted (MTP or early-exit) row and its plain baseline share."""
        return (self.model_idx, self.threads, self.n_ubatch, self.type_k, self.type_v, self.depth,
                self.kind, self.n)  # fmt: skip


def rows(p: BenchParams) -> list[Instance]:
    """Every instance in table order: per model and settings (in the order given), the pp tests,
    then each tg test without drafting followed by its MTP runs and its early-exit runs (one per
    exit layer, draft length, p_min and branch count)."""
    out = []
    for mi in range(len(p.models)):
        for t, ub, tk, tv, d in itertools.product(
            p.threads, p.n_ubatch, p.type_k, p.type_v, p.n_depth
        ):
            base = dict(model_idx=mi, threads=t, n_ubatch=ub, type_k=tk, type_v=tv, depth=d)
            out += [Instance(**base, kind="pp", n=n) for n in p.n_prompt if n]
            for n in filter(None, p.n_gen):
                if 0 in p.mtp:
                    out.append(Instance(**base, kind="tg", n=n))
                if 1 in p.mtp:
                    out += [
                        Instance(**base, kind="tg", n=n, mtp=1, draft=k, p_min=pm, branches=nb)
                        for k in p.draft
                        for pm in p.p_min
                        for nb in p.branches
                    ]
                out += [
                    Instance(**base, kind="tg", n=n, draft=k, p_min=pm, branches=nb, exit_layer=L)
                    for L in p.n_layer_exit
                    for k in p.draft
                    for pm in p.p_min
                    for nb in p.branches
                ]
    return out


def plan(p: BenchParams) -> list[Instance]:
    """`rows(p)` in measuring order: grouped by (model, MTP off/on) so each model is loaded once
    per group (no-MTP rows, early exit included, run on a load without NextN blocks, exactly like
    `llm run`)."""
    return sorted(rows(p), key=lambda i: (i.model_idx, i.mtp))  # stable: keeps the table order


def read_prompt_file(path: str | Path) -> list[str]:
    """--prompt-file: one prompt per paragraph (blocks of text separated by blank lines)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read --prompt-file {path}: {e}") from None
    prompts = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    if not prompts:
        raise LlmkitError(f"--prompt-file {path}: no text in it")
    return prompts


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single sample), as llama-bench."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
