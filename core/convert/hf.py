"""`llm convert`: a Hugging Face checkpoint directory -> one GGUF file, streamed tensor by tensor.

Reads config.json (+ tokenizer files) and the safetensors shards lazily, maps names with the
architecture's table (`core/convert_archs.py`), writes every tensor info first, then each tensor's
data as it is loaded, transformed and encoded, so peak memory is about the largest tensor. The output
is a temp file renamed into place only when complete (`core/outputs.py`), and never a file of the
checkpoint directory itself. Norms, 1-D tensors and MoE routers stay F32; 2-D/3-D weights take
`outtype` (q8_0 falls back to f16 for rows not divisible by 32, like llama.cpp).

MTP: NextN blocks (`model.layers.{n_main + i}`) become `blk.N.nextn.*` plus their block tensors and
`{arch}.nextn_predict_layers`; `mtp_mode="drop"` (--no-mtp) leaves them out, `"only"` (--mtp-only)
writes the MTP sidecar: the NextN blocks plus the embedding and head, with the full block count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

from llmkit.core.convert.archs import ArchPlan, Mapped, plan_for
from llmkit.core.convert.vocab import vocab_metadata
from llmkit.core.gguf.writer import add_kv
from llmkit.core.outputs import atomic_output, check_output
from llmkit.errors import LlmkitError

OUTTYPES = {"f32": (QT.F32, 0), "f16": (QT.F16, 1), "bf16": (QT.BF16, 32), "q8_0": (QT.Q8_0, 7)}
SHARED = ("token_embd.weight", "output_norm.weight", "output.weight")


@dataclass
class Item:
    hf_name: str
    shard: Path
    m: Mapped
    shape: tuple[int, ...]
    qtype: QT


def _shards(hf_dir: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json or the *.safetensors files."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise LlmkitError(f"bad {index}: {e}") from None
        missing = sorted({f for f in weight_map.values() if not (hf_dir / f).exists()})
        if missing:
            raise LlmkitError(f"{hf_dir}: missing safetensors shard {missing[0]}")
        return {k: hf_dir / v for k, v in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise LlmkitError(f"{hf_dir}: no *.safetensors files")
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                out.update({k: f for k in st.keys()})
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise LlmkitError(f"cannot read {f}: {e}") from None
    return out


def _storage_type(name: str, shape: tuple[int, ...], transform: str | None, outtype: QT) -> QT:
    if len(shape) < 2 or transform in ("plus1", "f32") or name.endswith("norm.weight"):
        return QT.F32
    if outtype == QT.Q8_0 and shape[-1] % 32:
        return QT.F16
    return outtype


def _encode(t: torch.Tensor, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return t.float().contiguous().numpy()
    if qtype == QT.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == QT.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    from llmkit.quant.quantize import quantize

    return quantize(t.float().contiguous(), qtype).numpy()


def _plan_items(hf_dir: Path, plan: ArchPlan, mode: str, outtype: QT) -> tuple[list[Item], int]:
    from safetensors import safe_open

    items, dropped = [], 0
    handles: dict[Path, object] = {}
    for hf_name, shard in sorted(_shards(hf_dir).items()):
        m = plan.map(hf_name)
        if m is None:
            continue
        is_mtp = m.layer is not None and m.layer >= plan.n_main
        if (mode == "drop" and is_mtp) or (mode == "only" and not is_mtp and m.name not in SHARED):
            dropped += is_mtp
            continue
        if shard not in handles:
            handles[shard] = safe_open(shard, framework="pt")
        shape = tuple(handles[shard].get_slice(hf_name).get_shape())
        items.append(
            Item(hf_name, shard, m, shape, _storage_type(m.name, shape, m.transform, outtype))
        )
    names = [i.m.name for i in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise LlmkitError(f"two checkpoint tensors map to {dup}")
    if mode == "only" and not any(i.m.layer is not None for i in items):
        raise LlmkitError("--mtp-only: the checkpoint has no MTP (NextN) layers")
    return items, dropped


def convert(
    hf_dir: str | Path, out: str | Path, outtype: str = "f16", mtp_mode: str = "keep", progress=None
) -> dict:
    """Convert `hf_dir` to `out`; returns a summary. `progress(done, total)` is called per tensor."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").exists():
        raise LlmkitError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint directory)")
    if outtype not in OUTTYPES:
        raise LlmkitError(f"unknown --outtype {outtype} (use {', '.join(OUTTYPES)})")
    check_output(out, [hf_dir])  # before the planning: -o into the checkpoint fails at once
    config = json.loads((hf_dir / "config.json").read_text())
    plan = plan_for(config, mtp_mode)
    if mtp_mode == "only" and plan.n_nextn == 0:
        raise LlmkitError("--mtp-only: the checkpoint declares no MTP (NextN) layers")
    qtype, ftype = OUTTYPES[outtype]
    items, dropped = _plan_items(hf_dir, plan, mtp_mode, qtype)
    md = {
        "general.name": config.get("_name_or_path") or hf_dir.name,
        "general.file_type": ftype,
        "general.quantization_version": 2,
        **plan.metadata,
        **vocab_metadata(hf_dir, config),
    }
    with atomic_output(out, [hf_dir]) as tmp:
        _write(tmp, plan, md, items, progress)
    return {
        "arch": plan.arch,
        "tensors": len(items),
        "mtp_dropped": dropped,
        "bytes": out.stat().st_size,
        "nextn": plan.metadata.get(f"{plan.arch}.nextn_predict_layers", 0),
    }


def _write(path: Path, plan: ArchPlan, md: dict, items: list[Item], progress) -> None:
    from safetensors import safe_open

    w = GGUFWriter(path, plan.arch)
    for k, v in md.items():
        add_kv(w, k, v)
    encoded_shapes = []
    for it in items:  # infos first: shapes and sizes are known without loading data
        probe = _encode(
            torch.zeros(1, it.shape[-1]) if len(it.shape) > 1 else torch.zeros(it.shape), it.qtype
        )
        shape = (*it.shape[:-1], probe.shape[-1])
        nbytes = int(np.prod(shape)) * probe.itemsize
        w.add_tensor_info(it.m.name, shape, probe.dtype, nbytes, raw_dtype=it.qtype)
        encoded_shapes.append(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    handles: dict[Path, object] = {}
    for n, (it, shape) in enumerate(zip(items, encoded_shapes), 1):
        if it.shard not in handles:
            handles[it.shard] = safe_open(it.shard, framework="pt")
        t = plan.apply(handles[it.shard].get_tensor(it.hf_name), it.m.transform)
        arr = _encode(t, it.qtype)
        assert arr.shape == shape, (it.m.name, arr.shape, shape)
        w.write_tensor_data(arr)
        if progress:
            progress(n, len(items))
    w.close()
