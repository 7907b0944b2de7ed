"""Freeze llama.cpp's quantizer output and tensor-type mixes as test references.

Run with the llama-cpp-python venv (never a dependency of llmkit):

    /work/llvenv/bin/python scripts/make_quant_refs.py

1. `tests/data/quant_refs.npz`: small random F32 tensors (rows of 256*k values, irregular row
   counts, outliers, all-zero and constant blocks) written as a tiny `llama` GGUF, quantized by
   `llama_model_quantize` with `pure=True` (every 2-D weight gets exactly the file type's tensor
   type, through `ggml_quantize_chunk`, no imatrix), for each type; stores inputs and output bytes.
2. `tests/data/quant_mix_refs.json`: the per-tensor types llama.cpp picks (pure=False) for the real
   SmolLM2-135M and Gemma 3 270M tensor lists. These use llama.cpp's `dry_run` (types are chosen from
   names and shapes only), on an F16 file with the real metadata, tensor names and shapes (zero data),
   parsing its per-tensor log lines.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path("/root/.cache/llmkit/models")

# name -> (llama ftype number, ggml tensor type)
FTYPES = {
    "Q4_0": (2, QT.Q4_0),
    "Q4_1": (3, QT.Q4_1),
    "Q8_0": (7, QT.Q8_0),
    "Q5_0": (8, QT.Q5_0),
    "Q5_1": (9, QT.Q5_1),
    "Q2_K": (10, QT.Q2_K),
    "Q3_K_S": (11, QT.Q3_K),
    "Q4_K_S": (14, QT.Q4_K),
    "Q5_K_S": (16, QT.Q5_K),
    "Q6_K": (18, QT.Q6_K),
    "IQ4_NL": (25, QT.IQ4_NL),
    "IQ4_XS": (30, QT.IQ4_XS),
    "F16": (1, QT.F16),
    "BF16": (32, QT.BF16),
}
MIX_FTYPES = {
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q3_K_M": 12,
    "Q4_K_S": 14,
    "Q2_K": 10,
    "IQ4_XS": 30,
    "Q3_K_S": 11,
    "Q3_K_L": 13,
    "Q5_K_S": 16,
    "Q6_K": 18,
    "Q4_0": 2,
    "Q8_0": 7,
    "IQ4_NL": 25,
}

_log: list[str] = []


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _on_log(level, text, user):
    _log.append(text.decode("utf-8", "replace"))


def ref_tensors(rng) -> dict[str, np.ndarray]:
    def scaled(rows, cols):
        return (rng.standard_normal((rows, cols)) * rng.uniform(0.001, 3.0, (rows, 1))).astype(
            np.float32
        )

    t = {}
    t["blk.0.attn_q.weight"] = scaled(5, 512)
    a = scaled(3, 256)
    a[0, 7] = 40.0  # one outlier
    a[1, 100] = -55.0
    a[2, :32] = 0.0  # all-zero block
    a[2, 40:48] = 1e-9  # tiny values
    t["blk.0.attn_k.weight"] = a
    b = rng.uniform(-1, 1, (9, 1024)).astype(np.float32)
    b[0, :] = 0.0  # all-zero super-block row
    b[1, :256] = 0.25  # constant positive super-block
    b[1, 256:512] = -0.5  # constant negative
    b[2, :] = np.abs(b[2, :])  # all positive (min > 0)
    b[3, :] = -np.abs(b[3, :])  # all negative
    b[4, :64] = np.linspace(-4, 4, 64)  # exact .5 ties after scaling
    t["blk.0.ffn_up.weight"] = b
    t["blk.0.ffn_down.weight"] = (rng.standard_t(3, (4, 768)) * 0.05).astype(
        np.float32
    )  # heavy tails
    t["blk.0.attn_v.weight"] = scaled(2, 256)
    return t


def write_llama(path: Path, tensors: dict[str, np.ndarray]) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(256)
    w.add_block_count(1)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(inp: Path, out: Path, ftype: int, pure: bool, dry_run: bool = False) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.pure = pure
    p.nthread = 2
    p.dry_run = dry_run
    _log.clear()
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(p))
    if rc != 0:
        sys.stderr.write("".join(_log))
        raise SystemExit(f"llama_model_quantize failed for ftype {ftype}")


def make_refs(tmp: Path) -> None:
    rng = np.random.default_rng(1234)
    tensors = ref_tensors(rng)
    inp = tmp / "ref_in.gguf"
    write_llama(inp, tensors)
    out_arrays = {f"in/{k}": v for k, v in tensors.items()}
    for name, (ftype, qt) in FTYPES.items():
        out = tmp / f"ref_{name}.gguf"
        quantize(inp, out, ftype, pure=True)
        r = GGUFReader(str(out))
        for t in r.tensors:
            if t.name not in tensors:
                continue
            if QT(t.tensor_type) != qt:
                raise SystemExit(f"{name}: {t.name} got {QT(t.tensor_type).name}, want {qt.name}")
            raw = np.asarray(t.data).view(np.uint8).reshape(tensors[t.name].shape[0], -1)
            out_arrays[f"{qt.name}/{t.name}"] = raw
        print(f"{name}: ok", flush=True)
    dst = ROOT / "tests" / "data" / "quant_refs.npz"
    np.savez_compressed(dst, **out_arrays)
    print(f"wrote {dst} ({dst.stat().st_size} bytes)")


def _copy_kv(w: GGUFWriter, r: GGUFReader) -> None:
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        if f.name.startswith("tokenizer."):
            continue  # not needed to choose tensor types
        vt = f.types[0]
        if vt == GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vt)


LINE = re.compile(r"\]\s+(\S+)\s+-\s+\[[^\]]*\], type =\s+(\S+), size =[^\n(]*(?:\((\S+)\))?")


def make_mix_refs(tmp: Path) -> None:
    result = {}
    for key, fname in (
        ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
    ):
        r = GGUFReader(str(MODELS / fname))
        arch = r.fields["general.architecture"].contents()
        inp = tmp / f"mix_{key}.gguf"
        w = GGUFWriter(str(inp), arch)
        _copy_kv(w, r)
        w.add_file_type(1)
        shapes = {}
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order
            shapes[t.name] = list(shape)
            dtype = np.float32 if len(shape) == 1 else np.float16
            w.add_tensor_info(
                t.name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # zero tensor data: the dry run picks types from names and shapes only
        with open(inp, "r+b") as fh:
            fh.seek(0, 2)
            end = fh.tell()
            pad = (-end) % 32
            total = pad
            for t in r.tensors:
                n = int(np.prod(t.shape)) * (4 if len(t.shape) == 1 else 2)
                total += n + ((-n) % 32)
            fh.truncate(end + total)
        w.close()
        result[key] = {"arch": arch, "shapes": shapes, "types": {}}
        for mix, ftype in MIX_FTYPES.items():
            quantize(inp, tmp / "dry.gguf", ftype, pure=False, dry_run=True)
            text = "".join(_log)
            types = {}
            for m in LINE.finditer(text):
                name, cur, new = m.group(1), m.group(2), m.group(3)
                types[name] = (new or cur).upper()
            if len(types) != len(r.tensors):
                sys.stderr.write(text[:3000])
                raise SystemExit(f"{key} {mix}: parsed {len(types)} of {len(r.tensors)} tensors")
            result[key]["types"][mix] = types
            print(f"{key} {mix}: {sorted(set(types.values()))}", flush=True)
        inp.unlink()
    dst = ROOT / "tests" / "data" / "quant_mix_refs.json"
    dst.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {dst}")


def main() -> None:
    llama_cpp.llama_log_set(_on_log, None)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "--mix-only" not in sys.argv:
            make_refs(tmp)
        if "--refs-only" not in sys.argv:
            make_mix_refs(tmp)


if __name__ == "__main__":
    main()
