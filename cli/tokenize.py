"""Print the tokens of a text, like llama-tokenize."""

from __future__ import annotations

from pathlib import Path

import typer


def tokenize(
    model: str = typer.Option(
        None, "-m", "--model", help="GGUF file or known model name (default: gemma3-270m)."
    ),
    prompt: str = typer.Option(None, "-p", "--prompt", help="Text to tokenize."),
    file: Path = typer.Option(None, "-f", "--file", help="Read the text from a file."),
    ids: bool = typer.Option(False, "--ids", help="Print only the list of ids."),
    no_bos: bool = typer.Option(
        False, "--no-bos", help="Do not add BOS/EOS even if the model wants them."
    ),
    no_parse_special: bool = typer.Option(
        False, "--no-parse-special", help="Treat special-token text as text."
    ),
    show_count: bool = typer.Option(
        False, "--show-count", help="Print the number of tokens at the end."
    ),
) -> None:
    """Tokenize text with the GGUF's tokenizer (ids identical to llama.cpp's)."""
    from llmkit.cli.common import read_prompt
    from llmkit.core.model.catalog import resolve_model
    from llmkit.core.models.loader import read_model_file
    from llmkit.core.tokenizer import load_tokenizer

    text = read_prompt(prompt, file, required=True)
    mf = read_model_file(resolve_model(model))  # the checks of `llm run`, without the weights
    tok = load_tokenizer(mf.gf.metadata)
    out = tok.encode(text, add_special=not no_bos, parse_special=not no_parse_special)
    if ids:
        print("[" + ", ".join(map(str, out)) + "]")
    else:
        for i in out:
            piece = tok.token_to_piece(i, special=True).decode("utf-8", errors="replace")
            print(f"{i:6d} -> '{piece}'")
    if show_count:
        print(f"Total number of tokens: {len(out)}")
