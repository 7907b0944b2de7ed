"""Which MTP sidecar belongs to which base model: identity checks and the shipped heads.

A sidecar written by `llm mtp-train` records `llmkit.mtp.base_id` (`base_identity`) instead
of a copy of the embedding; `llm run --mtp` on a model without NextN blocks and without `-md` looks
for a shipped head (`heads/*.gguf` inside the package) with that model's identity.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmkit.core.gguf.reader import GGUFFile
from llmkit.errors import LlmkitError

BASE_ID_KEY = "llmkit.mtp.base_id"  # written by `llm mtp-train` instead of an embedding copy
# a trained head's draft shortlist: uint32 token ids, sorted (core/mtp_train)
DRAFT_VOCAB_KEY = "llmkit.mtp.draft_vocab"
HEADS_DIR = Path(__file__).resolve().parents[2] / "heads"  # llmkit/heads/


def base_identity(gf: GGUFFile) -> str:
    """16 hex digits identifying a trunk's weights across quantizations."""
    arch = gf.architecture
    md = gf.metadata
    n_main = int(md.get(f"{arch}.block_count", 0)) - int(md.get(f"{arch}.nextn_predict_layers", 0))
    emb = gf.tensors.get("token_embd.weight")
    if emb is None or n_main <= 0:
        raise LlmkitError(f"{gf.path}: not a base model (no token_embd.weight or no layers)")
    h = hashlib.sha256(f"{arch}|{list(emb.shape)}|{n_main}".encode())
    for name in (
        "output_norm.weight",
        "blk.0.attn_norm.weight",
        f"blk.{n_main - 1}.ffn_norm.weight",
    ):
        if name in gf.tensors:
            h.update(name.encode())
            h.update(gf.raw(name).tobytes())
    return h.hexdigest()[:16]


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
