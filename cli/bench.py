"""Measure prompt processing and generation speed like llama-bench (comma lists sweep)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def _floats(flag: str, value: str) -> list[float]:
    """A comma list of numbers, duplicates dropped (order kept)."""
    from llmkit.errors import LlmkitError

    out = []
    for part in value.split(","):
        try:
            v = float(part.strip())
        except ValueError:
            raise LlmkitError(f"{flag}: {part.strip()!r} is not a number") from None
        if v not in out:
            out.append(v)
    return out


def _ints(flag: str, value: str) -> list[int]:
    """A comma list of integers, duplicates dropped (order kept)."""
    from llmkit.errors import LlmkitError

    out = []
    for part in value.split(","):
        try:
            out.append(int(part.strip()))
        except ValueError:
            raise LlmkitError(f"{flag}: {part.strip()!r} is not an integer") from None
    return list(dict.fromkeys(out))


def _words(value: str) -> list[str]:
    return list(dict.fromkeys(w.strip() for w in value.split(",")))


class _StderrProgress:
    """A rich progress bar on a terminal (results printed above it); plain result lines on
    stderr otherwise (logs, CI)."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.bar, self.task, self.n = None, None, 0

    def begin(self, total_runs: int) -> None:
        if not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.bar.add_task("bench", total=total_runs)
        self.bar.start()

    def status(self, desc: str) -> None:
        if self.bar is not None:  # logs get results only: an error stays the last line
            self.bar.update(self.task, description=desc)

    def run(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=desc, completed=self.n)
        self.n += 1

    def finished(self, r: dict) -> None:
        line = f"{r['model_type']} {r['test']}"
        if r["mtp"]:
            line += f" mtp draft {r['n_draft']}"
        elif r["spec"] == "early-exit":
            line += f" early-exit L{r['n_layer_exit']} draft {r['n_draft']}"
        line += f": {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} t/s"
        if r["acceptance_rate"] is not None:
            line += f", acceptance {r['acceptance_rate']:.3f}"
        if self.bar is not None:
            self.bar.console.print(line, highlight=False)
        else:
            print(f"bench: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def bench(
    model: list[str] = typer.Option(
        None,
        "-m",
        "--model",
        help="GGUF file or known model name; repeat for several (default: gemma3-270m).",
    ),
    n_prompt: str = typer.Option(
        "512", "-p", "--n-prompt", help="Prompt lengths of pp tests (comma list; 0: none)."
    ),
    n_gen: str = typer.Option(
        "128", "-n", "--n-gen", help="Generated tokens of tg tests (comma list; 0: none)."
    ),
    n_depth: str = typer.Option(
        "0", "-d", "--n-depth", help="Context tokens evaluated before each test (comma list)."
    ),
    repetitions: int = typer.Option(5, "-r", "--repetitions", help="Timed runs per test."),
    threads: str = typer.Option(
        None, "-t", "--threads", help="CPU threads (comma list; default: all cores)."
    ),
    n_ubatch: str = typer.Option(
        "512", "-ub", "--ubatch-size", help="Prompt tokens per forward pass (comma list)."
    ),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cpu, or -ngl's)."),
    n_gpu_layers: str = typer.Option(
        None, "-ngl", "--n-gpu-layers", help="N > 0: on the GPU when there is one."
    ),
    flash_attn: str = typer.Option(
        "auto", "-fa", "--flash-attn", help="on|off|auto (lists too): attention is always fused."
    ),
    cache_type_k: str = typer.Option(
        "f16",
        "-ctk",
        "--cache-type-k",
        help="K cache types (comma list): f16, f32, bf16, q8_0, q4_0.",
    ),
    cache_type_v: str = typer.Option(
        "f16", "-ctv", "--cache-type-v", help="V cache types (comma list), as -ctk."
    ),
    mtp: str = typer.Option(
        "0", "--mtp", help="MTP speculative decoding in tg tests: 0, 1 or 0,1 (needs NextN blocks)."
    ),
    model_draft: str = typer.Option(
        None,
        "-md",
        "--model-draft",
        help="The MTP rows' drafter: a gemma4-assistant GGUF or a NextN sidecar (needs --mtp 1).",
    ),
    spec: str = typer.Option(
        None,
        "--spec",
        help="Drafted tg rows beside the plain ones (comma list): early-exit, mtp (= --mtp 0,1).",
    ),
    n_layer_exit: str = typer.Option(
        None,
        "--n-layer-exit",
        help="Exit layers L of the early-exit rows (comma list; default: the model's best).",
    ),
    draft: str = typer.Option(
        None,
        "--draft",
        help="Draft tokens per round (comma list; default 3; needs --mtp 1 or --spec).",
    ),
    draft_p_min: str = typer.Option(
        "0",
        "--draft-p-min",
        help="Stop drafting below this draft probability (comma list; needs --mtp 1 or --spec).",
    ),
    draft_branches: str = typer.Option(
        "1",
        "--draft-branches",
        help="Candidates verified at the first draft position (comma list; needs a drafter).",
    ),
    output: str = typer.Option("md", "-o", "--output", help="md, json, jsonl or csv (stdout)."),
    no_warmup: bool = typer.Option(False, "--no-warmup", help="Skip each test's warm-up run."),
    prompt_file: Path = typer.Option(
        None,
        "--prompt-file",
        help="Real-text tg prompts, one per paragraph (default with --mtp 1: a built-in set).",
    ),
) -> None:
    """Benchmark models like llama-bench: pp/tg tests, sweeps over comma lists, MTP and
    early-exit acceptance."""
    import torch

    from llmkit.core.bench.params import BenchParams, read_prompt_file
    from llmkit.core.bench.report import FORMATS, environment, render
    from llmkit.core.bench.runner import check_early_exit, check_mtp, run_bench
    from llmkit.core.model.catalog import DEFAULT_MODEL, resolve_model
    from llmkit.errors import LlmkitError

    if output not in FORMATS:
        raise LlmkitError(f"-o: unknown output format {output!r} (use {', '.join(FORMATS)})")
    mtp_values = _ints("--mtp", mtp)
    specs = _words(spec) if spec is not None else []
    for name in specs:
        if name not in ("mtp", "early-exit"):
            raise LlmkitError(f"--spec: unknown drafter {name!r} (use early-exit, mtp)")
    if "mtp" in specs:  # the MTP rows next to the plain ones
        mtp_values = list(dict.fromkeys([*mtp_values, 1]))
    if n_layer_exit is not None and "early-exit" not in specs:
        raise LlmkitError(
            "--n-layer-exit sets the early-exit rows' layers: it needs --spec early-exit"
        )
    exits = []
    if "early-exit" in specs:
        exits = [0]  # 0: each model's default exit layer
        if n_layer_exit is not None:
            exits = _ints("--n-layer-exit", n_layer_exit)
            if any(v < 1 for v in exits):
                raise LlmkitError(f"--n-layer-exit values must be >= 1, got {min(exits)}")
    drafting = 1 in mtp_values or bool(exits)
    if draft is not None and not drafting:
        raise LlmkitError("--draft sets the draft length: it needs --mtp 1 or --spec")
    if draft_p_min != "0" and not drafting:
        raise LlmkitError("--draft-p-min gates drafting: it needs --mtp 1 or --spec")
    if draft_branches != "1" and not drafting:
        raise LlmkitError("--draft-branches shapes drafting: it needs --mtp 1 or --spec")
    from llmkit.cli.common import check_flash_attn, gpu_device

    check_flash_attn(flash_attn)
    device = gpu_device(device, n_gpu_layers)
    default_threads = os.cpu_count() or 1
    p = BenchParams(
        models=model or [DEFAULT_MODEL],
        n_prompt=_ints("-p", n_prompt),
        n_gen=_ints("-n", n_gen),
        n_depth=_ints("-d", n_depth),
        reps=repetitions,
        threads=_ints("-t", threads) if threads else [default_threads],
        n_ubatch=_ints("-ub", n_ubatch),
        type_k=_words(cache_type_k),
        type_v=_words(cache_type_v),
        mtp=mtp_values,
        draft=_ints("--draft", draft or "3"),
        p_min=_floats("--draft-p-min", draft_p_min),
        branches=_ints("--draft-branches", draft_branches),
        n_layer_exit=exits,
        device=device,
        warmup=not no_warmup,
        prompt_file=str(prompt_file) if prompt_file else None,
    )
    p.validate()
    if device == "cuda" and not torch.cuda.is_available():
        raise LlmkitError("--device cuda requested but no CUDA device is available")
    if prompt_file:
        p.prompts = read_prompt_file(prompt_file)
    # every check that can fail runs before the first (possibly long) measurement
    paths = [resolve_model(m) for m in p.models]
    if model_draft is not None:
        if 1 not in p.mtp:
            raise LlmkitError("-md/--model-draft is the MTP rows' drafter: it needs --mtp 1")
        p.model_draft = str(resolve_model(model_draft))
    if 1 in p.mtp:
        for path in paths:
            check_mtp(path, p.draft, p.model_draft and Path(p.model_draft))
    if p.n_layer_exit:
        for path in paths:
            check_early_exit(path, p.n_layer_exit, p.draft)
    progress = _StderrProgress()
    try:
        records = run_bench(p, paths, environment(device), progress)
    finally:
        progress.close()
    sys.stdout.write(render(records, output, p, default_threads))
    sys.stdout.flush()
