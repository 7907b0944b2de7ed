"""Convert a Hugging Face checkpoint (safetensors) to GGUF, keeping MTP (NextN) layers."""

from __future__ import annotations

from pathlib import Path

import typer


def convert(
    hf_dir: Path = typer.Argument(
        ..., help="Checkpoint directory: config.json, *.safetensors, tokenizer files."
    ),
    out: Path = typer.Option(..., "-o", "--outfile", help="Output .gguf path."),
    outtype: str = typer.Option(
        "f16", "--outtype", help="f32, f16, bf16 or q8_0 for weight matrices."
    ),
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Drop the MTP (NextN) layers."),
    mtp_only: bool = typer.Option(
        False, "--mtp-only", help="Write only the MTP sidecar (NextN layers + embedding/head)."
    ),
) -> None:
    """HF -> GGUF with llama.cpp's names and metadata (llama, gemma3, step3.5); streamed, atomic."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from llmkit.cli.common import eprint
    from llmkit.core.convert.hf import convert as run_convert
    from llmkit.errors import LlmkitError

    if no_mtp and mtp_only:
        raise LlmkitError("--no-mtp and --mtp-only exclude each other")
    mode = "drop" if no_mtp else "only" if mtp_only else "keep"
    with Progress(
        TextColumn("converting"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task("convert", total=None)
        summary = run_convert(
            hf_dir,
            out,
            outtype,
            mode,
            progress=lambda n, total: prog.update(task, completed=n, total=total),
        )
    if summary["mtp_dropped"]:
        eprint(f"--no-mtp: dropped {summary['mtp_dropped']} MTP (NextN) tensors")
    nextn = f", {summary['nextn']} NextN blocks" if summary["nextn"] else ""
    eprint(
        f"wrote {out}: {summary['arch']}, {summary['tensors']} tensors{nextn}, "
        f"{summary['bytes'] / 2**20:.2f} MiB"
    )
