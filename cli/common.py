"""Small helpers shared by subcommands (argument reading, stderr output)."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from llmkit.errors import LlmkitError


def read_prompt(prompt: str | None, file: Path | None, required: bool = False) -> str | None:
    if prompt is not None and file is not None:
        raise LlmkitError("give either -p or -f, not both")
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmkitError(f"cannot read prompt file {file}: {e}") from None
    if prompt is None and required:
        raise LlmkitError("no text given: use -p TEXT or -f FILE")
    return prompt


def read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read {what} {path}: {e}") from None


_BIAS = re.compile(
    r"\s*(\d+)\s*([+-])\s*(inf|infinity|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*", re.I
)
BIAS_MAX = 100.0  # the sampler's (OpenAI's) range; +inf (a certainty) stands for its top


def parse_logit_bias(items: list[str] | None) -> dict[int, float]:
    """llama.cpp's -l/--logit-bias TOKEN_ID(+|-)BIAS items (15043+1, 15043-inf) -> {id: bias}."""
    out = {}
    for item in items or []:
        m = _BIAS.fullmatch(item)
        if m is None:
            raise LlmkitError(f"--logit-bias {item!r}: expected TOKEN_ID(+|-)BIAS, e.g. 15043+1")
        v = float(m.group(3)) * (-1.0 if m.group(2) == "-" else 1.0)
        out[int(m.group(1))] = BIAS_MAX if v == math.inf else v  # -inf stays a ban
    return out


def parse_ngl(n_gpu_layers: str | None) -> int:
    """-ngl N | all | auto (llama-bench's comma lists: the largest) -> layers (-1: all)."""
    if n_gpu_layers is None:
        return 0
    vals = []
    for v in n_gpu_layers.split(","):
        if v.strip().lower() in ("all", "auto"):
            vals.append(-1)
            continue
        try:
            vals.append(int(v))
        except ValueError:
            raise LlmkitError(
                f"-ngl/--n-gpu-layers must be a number, all or auto, got {n_gpu_layers!r}"
            ) from None
    return -1 if -1 in vals else max(vals)


def check_flash_attn(flash_attn: str) -> None:
    """-fa on|off|auto (llama-bench: a comma list): accepted, attention is always fused."""
    from llmkit.cli.flags import FLASH_ATTN_VALUES

    if any(v.strip().lower() not in FLASH_ATTN_VALUES for v in flash_attn.split(",")):
        raise LlmkitError(f"-fa/--flash-attn must be on, off or auto, got {flash_attn!r}")


def llama_load_flags(n_gpu_layers: str | None, flash_attn: str, no_mmap: bool, mlock: bool,
                     no_repack: bool = False) -> dict:  # fmt: skip
    """LLM.load options for llama.cpp's -ngl, -fa, --no-mmap, --mlock, --no-repack (see
    cli/flags.py)."""
    check_flash_attn(flash_attn)
    return {"n_gpu_layers": parse_ngl(n_gpu_layers), "use_mmap": not no_mmap, "use_mlock": mlock,
            "repack": not no_repack}  # fmt: skip


def gpu_device(device: str | None, n_gpu_layers: str | None) -> str:
    """The device for --device / -ngl (commands that load without `LLM`); prints -ngl's note."""
    from llmkit.core.api import pick_device

    dev, note = pick_device(device, parse_ngl(n_gpu_layers))
    if note:
        eprint(f"warning: {note}")
    return dev


def set_threads(threads: int | None) -> int:
    """-t: the run's CPU threads (0: every core): the native pool's (torch, when a torch model
    loads, gets what kernels/ops.py's set_threads gives it beside the pool: core/api.py)."""
    from llmkit.kernels import native_abi

    n = threads if threads and threads > 0 else (os.cpu_count() or 1)
    if native_abi.available():
        native_abi.set_threads(n)
    else:
        from llmkit.kernels import ops

        ops.set_threads(n)
    return n


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def write_json_atomic(path: Path, obj, inputs=()) -> None:
    """Write to a temp file beside the target, then rename (`core/outputs.py`): never a partly
    written file, never one of `inputs`."""
    import json

    from llmkit.core.outputs import atomic_output

    with atomic_output(path, inputs) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def load_options() -> dict:
    """The typer options that `run` and `serve` share with llama.cpp (-ngl, -fa, --no-mmap,
    --mlock, --chat-template[-file], --jinja): one definition, the same help in both."""
    import typer

    return {
        "n_gpu_layers": typer.Option(
            None, "-ngl", "--n-gpu-layers", "--gpu-layers",
            help="N > 0 (or all/auto): the whole model on the GPU when there is one (no partial offload).",
        ),
        "flash_attn": typer.Option(
            "auto", "-fa", "--flash-attn", help="on|off|auto: accepted; attention is always fused."
        ),
        "no_mmap": typer.Option(False, "--no-mmap", help="Read all weights in at load."),
        "mlock": typer.Option(False, "--mlock", help="Lock the weights in RAM (mlock)."),
        "no_repack": typer.Option(
            False, "-nr", "--no-repack",
            help="CPU: read the weights as GGUF rows (no x8 groups).",
        ),
        "chat_template": typer.Option(
            None, "--chat-template", help="Chat template: built-in name (chatml, gemma) or jinja."
        ),
        "chat_template_file": typer.Option(
            None, "--chat-template-file", help="Read the jinja chat template from a file."
        ),
        "jinja": typer.Option(
            False, "--jinja", help="Accepted: chat templates are always rendered with jinja."
        ),
    }  # fmt: skip


LOAD = load_options()


def chat_template_option(chat_template: str | None, chat_template_file: Path | None) -> str | None:
    """--chat-template / --chat-template-file -> the template (a built-in name or jinja),
    checked before the model loads."""
    if chat_template is not None and chat_template_file is not None:
        raise LlmkitError("give --chat-template or --chat-template-file, not both")
    if chat_template_file is not None:
        chat_template = read_text(chat_template_file, "chat template file")
    if chat_template is not None:
        from llmkit.core.tokenizer.chat import named_chat_template

        named_chat_template(chat_template)  # an unknown name fails before loading
    return chat_template
