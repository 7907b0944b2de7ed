"""Give a GGUF model an MTP head: train NextN blocks by self-distillation on its frozen trunk."""

from __future__ import annotations

import typer


def mtp_train(
    model: str = typer.Option(..., "-m", "--model", help="Base GGUF (path or known name)."),
    out: str = typer.Option(..., "-o", "--out", help="Output MTP sidecar GGUF (for -md)."),
    blocks: int = typer.Option(
        1, "--blocks", help="NextN blocks: 1 = reused per draft step, K > 1 = chained."
    ),
    depth: int = typer.Option(3, "--depth", help="Draft positions trained (one reused block)."),
    text: list[str] = typer.Option([], "--text", help="Training text file (repeatable)."),
    generate: int = typer.Option(
        20000, "--generate", help="Tokens of text the base model writes itself (batched)."
    ),
    gen_len: int = typer.Option(128, "--gen-len", help="New tokens per generated sequence."),
    gen_batch: int = typer.Option(32, "--gen-batch", help="Sequences generated together."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training text chunk."),
    max_text_tokens: int = typer.Option(200000, "--max-text-tokens", help="Cap on text tokens."),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps."),
    batch: int = typer.Option(8, "--batch", help="Sequences per step."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW peak learning rate."),
    top_k: int = typer.Option(16, "--top-k", help="Teacher tokens kept per position."),
    draft_vocab: int = typer.Option(
        16384, "--draft-vocab", help="Draft-head token shortlist size (0: full vocabulary)."
    ),
    hidden_weight: float = typer.Option(
        0.0, "--hidden-weight", help="Weight of the hidden-state regression beside the KL loss."
    ),
    eval_prompts: str | None = typer.Option(
        None, "--eval-prompts", help="Prompts file (blank-line separated) to score greedily."
    ),
    eval_len: int = typer.Option(64, "--eval-len", help="Greedy tokens per evaluation prompt."),
    seed: int = typer.Option(0, "-s", "--seed", help="RNG seed."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: torch default)."),
    resume: str | None = typer.Option(None, "--resume", help="Checkpoint to continue from."),
    init: str | None = typer.Option(
        None, "--init", help="An MTP head (sidecar GGUF) whose blocks start the training."
    ),
    ckpt: str | None = typer.Option(None, "--ckpt", help="Checkpoint path (default OUT.ckpt)."),
    ckpt_every: int = typer.Option(100, "--ckpt-every", help="Steps between checkpoints."),
    eval_every: int = typer.Option(100, "--eval-every", help="Steps between held-out checks."),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Stop training after this many minutes (then export)."
    ),
    outtype: str = typer.Option("q8_0", "--outtype", help="Sidecar matrices: f32, f16, q8_0."),
    merge: str | None = typer.Option(
        None, "--merge", help="Also write the base model with the NextN blocks appended here."
    ),
    merge_type: str | None = typer.Option(
        None, "--merge-type", help="f32/f16/q8_0 for the merged blocks (default: like the trunk)."
    ),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
) -> None:
    """Train NextN (MTP) blocks for a llama / gemma3 GGUF; then `llm run -m BASE -md OUT --mtp`."""
    import torch

    from llmkit.cli.common import eprint
    from llmkit.core.model.catalog import resolve_model
    from llmkit.core.mtp_train.train import TrainConfig, train
    from llmkit.errors import LlmkitError

    if device not in ("cpu", "cuda"):
        raise LlmkitError(f"unknown device {device!r} (use cpu or cuda)")
    if threads < 0:
        raise LlmkitError("--threads must be >= 0")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        base=str(resolve_model(model)),
        out=out,
        blocks=blocks,
        depth=depth,
        text=list(text),
        generate=generate,
        gen_len=gen_len,
        gen_batch=gen_batch,
        seq_len=seq_len,
        max_text_tokens=max_text_tokens,
        steps=steps,
        batch=batch,
        lr=lr,
        top_k=top_k,
        draft_vocab=draft_vocab,
        hidden_weight=hidden_weight,
        eval_prompts=eval_prompts,
        eval_len=eval_len,
        seed=seed,
        device=device,
        resume=resume,
        init=init,
        outtype=outtype,
        merge=merge,
        merge_type=merge_type,
        ckpt=ckpt,
        ckpt_every=ckpt_every,
        eval_every=eval_every,
        max_minutes=max_minutes,
        quiet=quiet,
    )
    r = train(cfg)
    agree = ", ".join(f"{a:.3f}" for a in r.val_agree)
    eprint(
        f"wrote {r.out}: {r.steps} steps on {r.train_tokens} tokens, loss {r.first_loss:.3f} -> "
        f"{r.last_loss:.3f}, held-out top-1 agreement per draft position [{agree}], "
        f"{r.seconds['total']:.0f} s"
        + (
            f", evaluation prompts [{', '.join(f'{a:.3f}' for a in r.prompt_agree)}]"
            if r.prompt_agree
            else ""
        )
    )
