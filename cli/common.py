"""Small helpers shared by subcommands (argument reading, stderr output)."""

from __future__ import annotations

import os
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


def set_threads(threads: int | None) -> int:
    """-t: the threads of the native kernels and of PyTorch (0: every core)."""
    import torch

    from llmkit.kernels import cpu_native

    n = threads if threads and threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    if cpu_native.available():
        cpu_native.set_threads(n)
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
