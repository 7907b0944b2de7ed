"""Write trained NextN blocks as GGUF: an MTP-only sidecar (`llm run -md`, or found automatically
when shipped in `heads/`) or the base model rewritten with the blocks appended (`--merge`).

The sidecar holds only the NextN blocks and the base's architecture metadata (block_count = trunk +
K, nextn_predict_layers = K); instead of repeating the 50-170 MB embedding it records the base
model's identity (`llmkit.mtp.base_id`): a hash of the trunk's norm vectors (F32 in every llama.cpp
quantization, so one head serves every quant of the same weights) with the embedding shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.gguf.writer import RawTensor, write_gguf
from llmkit.core.model.sidecar import BASE_ID_KEY, DRAFT_VOCAB_KEY, base_identity
from llmkit.errors import LlmkitError
from llmkit.quant.quantize import QUANTIZERS, quantize

OUT_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}


def _encode(t: torch.Tensor, qtype: QT) -> np.ndarray | RawTensor:
    if t.ndim < 2 or qtype == QT.F32:
        return t.float().numpy()
    if qtype == QT.F16:
        return RawTensor(t.half().numpy(), QT.F16, tuple(t.shape))
    return RawTensor(quantize(t.float(), qtype).numpy(), qtype, tuple(t.shape))


def head_metadata(gf: GGUFFile, n_heads: int, extra: dict) -> dict:
    """The base's general.* and {arch}.* keys with the NextN blocks declared."""
    arch, md = gf.architecture, gf.metadata
    out = {k: v for k, v in md.items() if k.startswith((f"{arch}.", "general."))}
    n_main = int(md[f"{arch}.block_count"]) - int(md.get(f"{arch}.nextn_predict_layers", 0))
    out[f"{arch}.block_count"] = n_main + n_heads
    out[f"{arch}.nextn_predict_layers"] = n_heads
    return out | extra


def _vocab_md(draft_vocab: torch.Tensor | None) -> dict:
    return {} if draft_vocab is None else {DRAFT_VOCAB_KEY: draft_vocab.numpy().astype(np.uint32)}


def write_sidecar(
    path,
    gf: GGUFFile,
    blocks: dict[str, torch.Tensor],
    n_heads: int,
    qtype: QT,
    info,
    draft_vocab: torch.Tensor | None = None,
    inputs=(),
):
    """MTP-only GGUF: the NextN block tensors and the base's identity. `info` = training facts;
    `draft_vocab` = the draft head's token shortlist (none: the full vocabulary); `inputs`: files
    besides the base that the output must never replace."""
    extra = _vocab_md(draft_vocab) | {
        BASE_ID_KEY: base_identity(gf),
        "llmkit.mtp.base_name": str(gf.metadata.get("general.name", Path(gf.path).name)),
        "general.name": f"{gf.metadata.get('general.name', Path(gf.path).stem)} MTP head",
        **{f"llmkit.mtp.train.{k}": v for k, v in info.items()},
    }
    md = head_metadata(gf, n_heads, extra)
    md.pop("general.file_type", None)
    tensors = {n: _encode(t, qtype) for n, t in blocks.items()}
    return write_gguf(path, gf.architecture, md, tensors, inputs=(gf.path, *inputs))


def write_merged(
    path,
    gf: GGUFFile,
    blocks: dict[str, torch.Tensor],
    n_heads: int,
    qtype,
    info,
    draft_vocab: torch.Tensor | None = None,
    inputs=(),
):
    """The base model with the NextN blocks appended. `qtype` None: each NextN matrix takes the type
    of the same tensor in the trunk's last layer ("quantized like the trunk"). `inputs`: files
    besides the base that the output must never replace (the base is read while writing)."""
    if int(gf.metadata.get(f"{gf.architecture}.nextn_predict_layers", 0)):
        raise LlmkitError(f"{gf.path} already has NextN blocks: merge into a trunk-only file")
    md = dict(gf.metadata) | head_metadata(
        gf,
        n_heads,
        _vocab_md(draft_vocab) | {f"llmkit.mtp.train.{k}": v for k, v in info.items()},
    )
    tensors: dict = {}
    for name, ti in gf.tensors.items():
        raw = gf.raw(name)
        if ti.qtype in (QT.F32, QT.F16):  # gguf-py writes float tensors from typed arrays
            dt = np.float32 if ti.qtype == QT.F32 else np.float16
            raw = raw.reshape(-1).view(dt).reshape(tuple(ti.shape))
        tensors[name] = RawTensor(raw, ti.qtype, tuple(ti.shape))
    n_main = int(gf.metadata[f"{gf.architecture}.block_count"])
    for name, t in blocks.items():
        qt = qtype
        if qt is None:
            parts = name.split(".")
            ref = gf.tensors.get(".".join(["blk", str(n_main - 1), *parts[2:]]))
            qt = ref.qtype if ref is not None and t.ndim == 2 else QT.F32
            if qt not in QUANTIZERS and qt != QT.F32 or t.shape[-1] % GGML_QUANT_SIZES[qt][0]:
                qt = QT.Q8_0  # e.g. K-quants need 256-wide rows; Q8_0 fits every row here
        tensors[name] = _encode(t, qt)
    return write_gguf(Path(path), gf.architecture, md, tensors, inputs=(gf.path, *inputs))
