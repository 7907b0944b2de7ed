"""Which MTP sidecar belongs to which base model: identity checks and the shipped heads.

A sidecar written by `llm mtp-train` records `llmkit.mtp.base_id` (export.base_identity) instead
of a copy of the embedding; `llm run --mtp` on a model without NextN blocks and without `-md` looks
for a shipped head (`heads/*.gguf` inside the package) with that model's identity.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.core.errors import LlmkitError
from llmkit.core.gguf_file import GGUFFile
from llmkit.core.mtp_train.export import BASE_ID_KEY, base_identity

HEADS_DIR = Path(__file__).resolve().parents[2] / "heads"  # llmkit/heads/


def check_sidecar(gf: GGUFFile, gd: GGUFFile) -> None:
    """One-line error unless the trained sidecar `gd` was trained on `gf`'s weights."""
    want, got = gd.metadata.get(BASE_ID_KEY), base_identity(gf)
    if gd.architecture != gf.architecture or want != got:
        base = gd.metadata.get("llmkit.mtp.base_name", "?")
        raise LlmkitError(
            f"MTP sidecar {gd.path} does not belong to this model (trained for {base!r}, "
            f"{gd.architecture} id {want}; model: {gf.architecture} id {got})"
        )


def shipped_head(gf: GGUFFile, heads_dir: Path = HEADS_DIR) -> Path | None:
    """The shipped sidecar whose recorded base identity is `gf`'s, if any."""
    if not heads_dir.is_dir():
        return None
    ident = base_identity(gf)
    for p in sorted(heads_dir.glob("*.gguf")):
        try:
            md = GGUFFile(p).metadata
        except LlmkitError:
            continue
        if md.get(BASE_ID_KEY) == ident and md.get("general.architecture") == gf.architecture:
            return p
    return None
