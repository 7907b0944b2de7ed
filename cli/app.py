"""The `llm` command: a thin Typer app; every subcommand lives in its own module and imports the
heavy machinery (torch, the model code) only when it runs, so `llm --help` is instant."""

from __future__ import annotations

import os
import sys

import typer

from llmkit.cli import bench as bench_cmd
from llmkit.cli import convert as convert_cmd
from llmkit.cli import models as models_cmd
from llmkit.cli import mtp_train as mtp_train_cmd
from llmkit.cli import perplexity as perplexity_cmd
from llmkit.cli import quantize as quantize_cmd
from llmkit.cli import run as run_cmd
from llmkit.cli import serve as serve_cmd
from llmkit.cli import tokenize as tokenize_cmd
from llmkit.cli.flags import LlamaCommand

app = typer.Typer(
    name="llm",
    help="Run GGUF models like llama.cpp, from Python.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("run", help=run_cmd.__doc__, cls=LlamaCommand)(run_cmd.run)
app.command("tokenize", help=tokenize_cmd.__doc__, cls=LlamaCommand)(tokenize_cmd.tokenize)
app.command("models", help=models_cmd.__doc__, cls=LlamaCommand)(models_cmd.models)
app.command("quantize", help=quantize_cmd.__doc__, cls=LlamaCommand)(quantize_cmd.quantize)
app.command("bench", help=bench_cmd.__doc__, cls=LlamaCommand)(bench_cmd.bench)
app.command("perplexity", help=perplexity_cmd.__doc__, cls=LlamaCommand)(perplexity_cmd.perplexity)
app.command("convert", help=convert_cmd.__doc__, cls=LlamaCommand)(convert_cmd.convert)
app.command("serve", help=serve_cmd.__doc__, cls=LlamaCommand)(serve_cmd.serve)
app.command("mtp-train", help=mtp_train_cmd.__doc__, cls=LlamaCommand)(mtp_train_cmd.mtp_train)

# Typer ships its own copy of click; its usage errors derive from that copy's ClickException.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback
    (set LLMKIT_DEBUG=1 to see one)."""
    from llmkit.errors import LlmkitError

    debug = os.environ.get("LLMKIT_DEBUG") == "1"
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:
        rc = 130
    except _USAGE_ERROR as e:  # bad flags / values
        print(f"error: {e.format_message()}", file=sys.stderr)
        rc = e.exit_code
    except LlmkitError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    except BrokenPipeError:
        rc = 0
    except MemoryError:
        if debug:
            raise
        print("error: out of memory", file=sys.stderr)
        rc = 1
    except Exception:  # a bug of ours: one line, no internal text, and how to see the traceback
        if debug:
            raise
        print(
            "error: internal error, please report it (run with LLMKIT_DEBUG=1 for the details)",
            file=sys.stderr,
        )
        rc = 70  # EX_SOFTWARE
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
