"""Perplexity of a text (like llama-perplexity), and KL divergence against a base model's run."""

from __future__ import annotations

from pathlib import Path

import typer

from llmkit.cli.common import LOAD


def perplexity(
    model: str = typer.Option(
        None, "-m", "--model", help="GGUF file or known model name (default: gemma3-270m)."
    ),
    file: Path = typer.Option(..., "-f", "--file", help="Text file to score."),
    ctx_size: int = typer.Option(512, "-c", "--ctx-size", help="Chunk size in tokens."),
    chunks: int = typer.Option(-1, "--chunks", help="Score at most this many chunks (-1: all)."),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: all cores)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cpu, or -ngl's)."),
    n_gpu_layers: str = LOAD["n_gpu_layers"],
    flash_attn: str = LOAD["flash_attn"],
    cache_type_k: str = typer.Option(
        "f16", "-ctk", "--cache-type-k", help="K cache type (f16, q8_0, q4_0, turbo4, ...)."
    ),
    cache_type_v: str = typer.Option(
        "f16", "-ctv", "--cache-type-v", help="V cache type (f16, q8_0, q4_0, turbo4, ...)."
    ),
    kl_base: Path = typer.Option(
        None,
        "--kl-divergence-base",
        help="Base log-probs file: written, or read with --kl-divergence.",
    ),
    kl: bool = typer.Option(
        False, "--kl-divergence", help="Compare with the saved base log-probs."
    ),
) -> None:
    """Perplexity over chunks of -c tokens, scoring the second half of each (llama-perplexity's method)."""
    from llmkit.cli.common import check_flash_attn, eprint, gpu_device, read_prompt, set_threads
    from llmkit.core.model.catalog import resolve_model
    from llmkit.core.models.loader import load_model
    from llmkit.core.outputs import check_output
    from llmkit.core.perplexity import BaseLogprobs, perplexity
    from llmkit.core.tokenizer import load_tokenizer
    from llmkit.errors import LlmkitError

    if kl and kl_base is None:
        raise LlmkitError("--kl-divergence needs --kl-divergence-base FILE (from a base run)")
    check_flash_attn(flash_attn)
    device = gpu_device(device, n_gpu_layers)
    set_threads(threads)
    text = read_prompt(None, file, required=True)
    save_rows = [] if kl_base is not None and not kl else None
    model_path = resolve_model(model)
    inputs = (model_path, file)  # the base log-probs file must never replace these
    if save_rows is not None:
        check_output(kl_base, inputs)  # now, not after the whole run
    lm = load_model(model_path, device=device)
    tok = load_tokenizer(lm.metadata)
    tokens = tok.encode(text, add_special=True, parse_special=False)
    base = BaseLogprobs.load(kl_base) if kl else None
    if base is not None and (base.tokens != tokens or base.n_ctx != ctx_size):
        raise LlmkitError(f"{kl_base} was made from another text or -c (tokens/context differ)")
    eprint(f"perplexity: {len(tokens)} tokens, {len(tokens) // ctx_size} chunks of {ctx_size}")
    parts = []

    def progress(i, ppl):
        parts.append(f"[{i}]{ppl:.4f}")
        eprint(",".join(parts))

    res = perplexity(
        lm.model,
        lambda n: lm.new_cache(n, margin=n, type_k=cache_type_k, type_v=cache_type_v),
        tokens,
        ctx_size,
        tok.bos_id if tok.add_bos else None,
        chunks,
        base,
        save_rows,
        progress,
    )
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_error:.5f}")
    if save_rows is not None:
        BaseLogprobs(tokens, ctx_size, save_rows).save(kl_base, inputs)
        eprint(f"saved base log-probs of {res.n_tokens} tokens to {kl_base}")
    summary = res.kld_summary()
    if summary:
        print(f"Mean    KLD: {summary['mean_kld']:10.6f} +/- {summary['mean_kld_error']:10.6f}")
        print(f"Maximum KLD: {summary['max_kld']:10.6f}")
        print(f"Same top p : {100 * summary['same_top1']:6.3f} %")
