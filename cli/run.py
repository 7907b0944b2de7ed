"""Generate text from a prompt (like llama-cli / llama-completion)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from llmkit.cli.common import LOAD, eprint


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
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cpu, or -ngl's)."),
    n_gpu_layers: str = LOAD["n_gpu_layers"],
    flash_attn: str = LOAD["flash_attn"],
    no_mmap: bool = LOAD["no_mmap"],
    mlock: bool = LOAD["mlock"],
    no_repack: bool = LOAD["no_repack"],
    batch_size: int = typer.Option(
        512, "-ub", "--ubatch-size", help="Prompt tokens per forward pass."
    ),
    conversation: bool = typer.Option(
        False,
        "-cnv/-no-cnv",
        "--conversation/--no-conversation",
        "--cnv/--no-cnv",
        help="Chat mode with the GGUF chat template (default: off).",
    ),
    system: str = typer.Option(
        None, "-sys", "--system-prompt", help="System message for chat mode."
    ),
    system_file: Path = typer.Option(
        None, "-sysf", "--system-prompt-file", help="Read the system message from a file."
    ),
    chat_template: str = LOAD["chat_template"],
    chat_template_file: Path = LOAD["chat_template_file"],
    jinja: bool = LOAD["jinja"],
    reverse_prompt: list[str] = typer.Option(
        None, "-r", "--reverse-prompt", help="Stop at this text (-cnv: back to the prompt)."
    ),
    presence_penalty: float = typer.Option(
        0.0, "--presence-penalty", help="Penalty for tokens already present (0.0: off)."
    ),
    frequency_penalty: float = typer.Option(
        0.0, "--frequency-penalty", help="Penalty by the count of each earlier token (0.0: off)."
    ),
    logit_bias: list[str] = typer.Option(
        None, "-l", "--logit-bias", help="TOKEN_ID(+|-)BIAS, e.g. 15043+1 or 15043-inf."
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
        "f16", "-ctk", "--cache-type-k", help="K cache type: f16, f32, bf16, q8_0, q4_0, turbo3|4."
    ),
    cache_type_v: str = typer.Option(
        "f16", "-ctv", "--cache-type-v", help="V cache type: f16, f32, bf16, q8_0, q4_0, turbo3|4."
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
    spec: str = typer.Option(
        None, "--spec", help="Drafter: mtp (same as --mtp) or early-exit (the first L layers)."
    ),
    n_layer_exit: int = typer.Option(
        0,
        "--n-layer-exit",
        help="Run only the first L layers (with --spec early-exit: draft with them; "
        "default: the model's measured best).",
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
    grammar: str = typer.Option(
        None, "--grammar", help="GBNF grammar (llama.cpp syntax) the output must follow."
    ),
    grammar_file: Path = typer.Option(
        None, "--grammar-file", help="Read the GBNF grammar from a file."
    ),
    tp: int = typer.Option(
        1, "--tp", help="Tensor-parallel ranks: local processes (gloo on a CPU, NCCL on GPUs)."
    ),
    tp_mode: str = typer.Option(
        "exact", "--tp-mode", help="exact (gathers, tp=1's bits) or sum (Megatron partial sums)."
    ),
    split_mode: str = typer.Option(
        "none", "--split-mode", help="none, or layer: consecutive layers on several devices."
    ),
    tensor_split: str = typer.Option(
        None, "--tensor-split", help="Layer shares per device with --split-mode layer, e.g. 1,1."
    ),
    json_schema: str = typer.Option(
        None, "-j", "--json-schema", help="JSON schema the output must follow (e.g. '{}')."
    ),
) -> None:
    """Generate text with a GGUF model; streams tokens, prints llama.cpp-style timings to stderr."""
    from llmkit.cli.common import (
        chat_template_option,
        llama_load_flags,
        parse_logit_bias,
        read_prompt,
        read_text,
        set_threads,
        write_json_atomic,
    )
    from llmkit.cli.report import chat_loop, print_plan, print_timings, reverse_hit
    from llmkit.core.api import LLM, sampler_params
    from llmkit.core.decode.grammar import read_grammar
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
    bias = parse_logit_bias(logit_bias)
    params = sampler_params(
        temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n, seed=seed,
        **{k: v for k, v in (("presence_penalty", presence_penalty),
                             ("frequency_penalty", frequency_penalty),
                             ("logit_bias", bias)) if v},
    )  # fmt: skip
    if system is not None and system_file is not None:
        raise LlmkitError("give either -sys or -sysf, not both")
    if system_file is not None:
        system = read_text(system_file, "system prompt file")
    chat_template = chat_template_option(chat_template, chat_template_file)
    constraint = read_grammar(grammar, grammar_file, json_schema)
    if constraint is not None and (mtp or conversation or ignore_eos):
        flag = "--mtp" if mtp else "-cnv" if conversation else "--ignore-eos"
        raise LlmkitError(f"--grammar/--grammar-file/--json-schema cannot be combined with {flag}")
    if draft_branches > 1 and (not (mtp or spec) or temp > 0):
        raise LlmkitError("--draft-branches > 1 needs --mtp and greedy decoding (--temp 0)")
    from llmkit.core.distributed.launch import begin_run, finish, parse_layer_split, rank_plans

    layer_split = parse_layer_split(split_mode, tensor_split, device)
    group = begin_run(tp, tp_mode, threads, device, model, model_draft, mtp, moe_n_expert)
    llm = LLM.load(
        model,
        n_ctx=ctx_size,
        n_ubatch=batch_size,
        device=device,
        **llama_load_flags(n_gpu_layers, flash_attn, no_mmap, mlock, no_repack),
        chat_template=chat_template,
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
        spec=spec,
        n_layer_exit=n_layer_exit,
        tp=group,
        tp_mode=tp_mode,
        layer_split=layer_split,
    )
    for w in llm.warnings:
        eprint(f"warning: {w}")
    if bias and max(bias) >= llm.tokenizer.n_vocab:
        raise LlmkitError(f"--logit-bias: token id {max(bias)} is outside the vocabulary")
    if verbose:
        print_plan(llm)
        for r in rank_plans(group, llm) if group is not None else ():
            eprint(f"tp rank {r['rank']}: weights {r['weights_bytes'] / 2**20:.2f} MiB, kv "
                   f"{r['kv_bytes'] / 2**20:.2f} MiB (+ draft {r['draft_kv_bytes'] / 2**20:.2f})")  # fmt: skip
    if conversation:
        chat_loop(llm, text, system, params, n_predict, ignore_eos, verbose, reverse_prompt)
    else:
        if not no_display_prompt:
            sys.stdout.write(text)
            sys.stdout.flush()
        ids, out = llm.tokenize(text), ""
        for piece in llm.stream(ids, params, n_predict, ignore_eos, grammar=constraint):
            sys.stdout.write(piece)
            sys.stdout.flush()
            out += piece
            if reverse_hit(out, piece, reverse_prompt):
                break
        sys.stdout.write("\n")
    print_timings(llm)
    finish(group)
    if stats_json and (group is None or group.rank == 0):
        inputs = [p for p in (llm.lm.path, model_draft, file) if p is not None]
        write_json_atomic(stats_json, llm.stats_dict(n_threads), inputs=inputs)
