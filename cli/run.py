"""Generate text from a prompt (like llama-cli / llama-completion)."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    model: str = typer.Option(
        None,
        "-m",
        "--model",
        help="GGUF file or known model name (default: gemma3-270m, from PyPI).",
    ),
    prompt: str = typer.Option(None, "-p", "--prompt", help="Prompt text."),
    file: Path = typer.Option(None, "-f", "--file", help="Read the prompt from a file."),
    n_predict: int = typer.Option(
        -1, "-n", "--n-predict", help="Tokens to generate (-1: until EOS or a full context)."
    ),
    ctx_size: int = typer.Option(
        4096, "-c", "--ctx-size", help="Context size in tokens (0: the model's training context)."
    ),
    seed: int = typer.Option(-1, "-s", "--seed", help="RNG seed (-1: random)."),
    temp: float = typer.Option(0.8, "--temp", help="Temperature (0: greedy)."),
    top_k: int = typer.Option(40, "--top-k", help="Top-k sampling (0: off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Top-p sampling (1.0: off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Min-p sampling (0.0: off)."),
    repeat_penalty: float = typer.Option(
        1.0, "--repeat-penalty", help="Penalty for repeated tokens (1.0: off)."
    ),
    repeat_last_n: int = typer.Option(
        64, "--repeat-last-n", help="Tokens considered by the repeat penalty."
    ),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Keep generating past end-of-generation tokens."
    ),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: all cores)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    batch_size: int = typer.Option(
        512, "-ub", "--ubatch-size", help="Prompt tokens per forward pass."
    ),
    conversation: bool = typer.Option(
        False, "-cnv", "--conversation", help="Chat mode with the GGUF chat template."
    ),
    system: str = typer.Option(
        None, "-sys", "--system-prompt", help="System message for chat mode."
    ),
    no_display_prompt: bool = typer.Option(
        False, "--no-display-prompt", help="Do not echo the prompt."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print the memory plan and model details."
    ),
    stats_json: Path = typer.Option(
        None, "--stats-json", help="Write run statistics as JSON to this file."
    ),
) -> None:
    """Generate text with a GGUF model; streams tokens, prints llama.cpp-style timings to stderr."""
    from llmkit.cli.common import read_prompt, set_threads
    from llmkit.core.errors import LlmkitError
    from llmkit.core.runner import Runner, RunOptions
    from llmkit.core.sampling import SamplerParams

    text = read_prompt(prompt, file)
    if text is None and not conversation:
        raise LlmkitError("no prompt: use -p TEXT or -f FILE (or -cnv for chat)")
    if n_predict < -1:
        raise LlmkitError(f"-n must be >= -1, got {n_predict}")
    if ctx_size < 0:
        raise LlmkitError(f"-c must be >= 0, got {ctx_size}")
    if batch_size < 1:
        raise LlmkitError(f"-ub must be >= 1, got {batch_size}")
    n_threads = set_threads(threads)
    params = SamplerParams(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    params.validate()
    opts = RunOptions(
        model=model,
        n_ctx=ctx_size,
        n_ubatch=batch_size,
        device=device,
        threads=n_threads,
        verbose=verbose,
    )
    runner = Runner.open(opts)
    if verbose:
        runner.print_plan()
    if conversation:
        runner.chat(text, system, params, n_predict, ignore_eos)
    else:
        runner.complete(text, params, n_predict, ignore_eos, echo_prompt=not no_display_prompt)
    runner.print_timings()
    if stats_json:
        runner.write_stats(stats_json)
