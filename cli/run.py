"""Generate text from a prompt (like llama-cli / llama-completion)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from llmkit.cli.common import eprint


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
    cache_type_k: str = typer.Option(
        "f16", "-ctk", "--cache-type-k", help="K cache type: f16, f32, bf16, q8_0, q4_0."
    ),
    cache_type_v: str = typer.Option(
        "f16", "-ctv", "--cache-type-v", help="V cache type: f16, f32, bf16, q8_0, q4_0."
    ),
    mtp: bool = typer.Option(
        False, "--mtp", help="Speculative decoding with the model's NextN (MTP) blocks."
    ),
    model_draft: str = typer.Option(
        None, "-md", "--model-draft", help="MTP-only sidecar GGUF (with --mtp)."
    ),
    draft: int = typer.Option(
        3, "--draft", help="Max draft tokens per round (chained NextN blocks: at most their count)."
    ),
    draft_p_min: float = typer.Option(
        0.0, "--draft-p-min", help="Stop drafting below this draft probability."
    ),
    draft_branches: int = typer.Option(
        1,
        "--draft-branches",
        help="Candidates verified at the first draft position (draft tree; greedy only).",
    ),
    cache_type_k_draft: str = typer.Option(
        "f16", "-ctkd", "--cache-type-k-draft", help="K cache type of the MTP context."
    ),
    cache_type_v_draft: str = typer.Option(
        "f16", "-ctvd", "--cache-type-v-draft", help="V cache type of the MTP context."
    ),
    moe_n_expert: int = typer.Option(
        None, "--moe-n-expert", help="Routed experts per token (MoE models; default: the file's)."
    ),
) -> None:
    """Generate text with a GGUF model; streams tokens, prints llama.cpp-style timings to stderr."""
    from llmkit.cli.common import read_prompt, set_threads, write_json_atomic
    from llmkit.cli.report import chat_loop, print_plan, print_timings
    from llmkit.core.api import LLM, sampler_params
    from llmkit.errors import LlmkitError

    text = read_prompt(prompt, file)
    if text is None and not conversation:
        raise LlmkitError("no prompt: use -p TEXT or -f FILE (or -cnv for chat)")
    if n_predict < -1:
        raise LlmkitError(f"-n must be >= -1, got {n_predict}")
    if ctx_size < 0:
        raise LlmkitError(f"-c must be >= 0, got {ctx_size}")
    if batch_size < 1:
        raise LlmkitError(f"-ub must be >= 1, got {batch_size}")
    if stats_json is not None:  # refused before any work: never the model or the prompt file
        from llmkit.core.model.catalog import resolve_model
        from llmkit.core.outputs import check_output

        check_output(stats_json, [p for p in (resolve_model(model), model_draft, file) if p])
    n_threads = set_threads(threads)
    params = sampler_params(
        temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n, seed=seed,
    )  # fmt: skip
    if draft_branches > 1 and (not mtp or temp > 0):
        raise LlmkitError("--draft-branches > 1 needs --mtp and greedy decoding (--temp 0)")
    llm = LLM.load(
        model,
        n_ctx=ctx_size,
        n_ubatch=batch_size,
        device=device,
        type_k=cache_type_k,
        type_v=cache_type_v,
        mtp=mtp,
        model_draft=model_draft,
        draft=draft,
        draft_p_min=draft_p_min,
        draft_branches=draft_branches,
        type_k_draft=cache_type_k_draft,
        type_v_draft=cache_type_v_draft,
        moe_n_expert=moe_n_expert,
    )
    for w in llm.warnings:
        eprint(f"warning: {w}")
    if verbose:
        print_plan(llm)
    if conversation:
        chat_loop(llm, text, system, params, n_predict, ignore_eos, verbose)
    else:
        if not no_display_prompt:
            sys.stdout.write(text)
            sys.stdout.flush()
        for piece in llm.stream(llm.tokenize(text), params, n_predict, ignore_eos):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    print_timings(llm)
    if stats_json:
        inputs = [p for p in (llm.lm.path, model_draft, file) if p is not None]
        write_json_atomic(stats_json, llm.stats_dict(n_threads), inputs=inputs)
