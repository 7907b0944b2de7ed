"""The name/shape contract of an architecture's weights as data, without torch: `TensorSpec`s,
the tables every architecture builds them from (trunk, blocks, NextN blocks), and the check
against a GGUF file that fails with one line naming the first missing, unexpected, wrongly
shaped or unsupported tensor. core/model/weights.py wraps the checked tensors for the torch
path, core/lean/ for the torch-free one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from llmkit.errors import LlmkitError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    optional: bool = False


def check_tensors(gf, specs: list[TensorSpec], supported, ignore_prefixes: tuple[str, ...] = ()):
    """{name: the file's tensor info} for every spec'd tensor the file holds; an error on a
    missing, unexpected, mis-shaped or unsupported one (a type not in `supported`). Tensors whose
    names start with one of `ignore_prefixes` are left unread (e.g. NextN blocks when MTP is
    off): neither returned nor reported as unexpected."""
    by_name = {s.name: s for s in specs}
    for name in gf.tensors:
        if name not in by_name and not name.startswith(ignore_prefixes):
            raise LlmkitError(f"{gf.path}: unexpected tensor {name} for {gf.architecture}")
    out = {}
    for s in specs:
        info = gf.tensors.get(s.name)
        if info is None:
            if s.optional:
                continue
            raise LlmkitError(f"{gf.path}: missing tensor {s.name}")
        if tuple(info.shape) != tuple(s.shape):
            raise LlmkitError(
                f"{gf.path}: tensor {s.name} has shape {list(info.shape)}, expected {list(s.shape)}"
            )
        if info.qtype not in supported:
            raise LlmkitError(f"{gf.path}: tensor {s.name} has unsupported type {info.qtype.name}")
        out[s.name] = info
    return out


def ignore_prefixes(c, part: str) -> tuple[str, ...]:
    """`blk.N.` prefixes outside `part` ("trunk" or "mtp"), for check_tensors' ignore_prefixes."""
    if part not in ("trunk", "mtp"):
        raise ValueError(f"part must be trunk or mtp, not {part!r}")
    mine = range(c.n_layer) if part == "trunk" else range(c.n_layer, c.n_layer_all)
    return tuple(f"blk.{il}." for il in range(c.n_layer_all) if il not in mine)


def block_specs(c, il: int, linears: dict, norms: dict, shapes) -> list[TensorSpec]:
    """TensorSpecs of block il from a name table: `linears` maps an attribute to the GGUF parts
    it fuses, `norms` an attribute to its GGUF name, `shapes(c, gguf_name)` gives each shape."""
    names = [n for parts in linears.values() for n in parts] + list(norms.values())
    return [TensorSpec(f"blk.{il}.{n}.weight", shapes(c, n)) for n in names]


def trunk_specs(c, specs_of, extra: tuple[TensorSpec, ...] = ()) -> list[TensorSpec]:
    """The trunk's tensors: embedding, output norm, the head (absent when tied to the
    embedding), `extra` globals, and blocks 0 .. n_layer - 1 (`specs_of(il)`)."""
    H, V = c.n_embd, c.n_vocab
    specs = [
        TensorSpec("token_embd.weight", (V, H)),
        TensorSpec("output_norm.weight", (H,)),
        TensorSpec("output.weight", (V, H), optional=True),
        *extra,
    ]
    return specs + [s for il in range(c.n_layer) for s in specs_of(il)]


def nextn_specs(c, block_specs: Callable[[int], list[TensorSpec]]) -> list[TensorSpec]:
    """Embedding/head (the trunk's, optional in a sidecar) and every NextN block: its decoder
    block tensors (`block_specs(il)`, the architecture's) and the nextn.* tensors."""
    H, V = c.n_embd, c.n_vocab
    specs = [
        TensorSpec("token_embd.weight", (V, H), optional=True),
        TensorSpec("output_norm.weight", (H,), optional=True),
        TensorSpec("output.weight", (V, H), optional=True),
    ]
    for il in range(c.n_layer, c.n_layer_all):
        b = f"blk.{il}.nextn."
        specs += block_specs(il) + [
            TensorSpec(b + "eh_proj.weight", (H, 2 * H)),
            TensorSpec(b + "enorm.weight", (H,)),
            TensorSpec(b + "hnorm.weight", (H,)),
            TensorSpec(b + "shared_head_norm.weight", (H,), optional=True),
            TensorSpec(b + "shared_head_head.weight", (V, H), optional=True),
            TensorSpec(b + "embed_tokens.weight", (V, H), optional=True),
        ]
    return specs


def vocab_overrides(gf) -> dict:
    """The config values the file's tensors decide ({"n_vocab": rows of token_embd}), after
    checking the embedding exists and has a row per vocabulary token (llama.cpp: a shape error)."""
    emb = gf.tensors.get("token_embd.weight")
    if emb is None:
        raise LlmkitError(f"{gf.path}: missing tensor token_embd.weight")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != emb.shape[0]:
        raise LlmkitError(
            f"{gf.path}: the vocabulary has {len(tokens)} tokens but token_embd.weight has "
            f"{emb.shape[0]} rows"
        )
    return {"n_vocab": emb.shape[0]}


def weights_by_type(tensors: dict) -> dict[str, dict[str, int]]:
    """{type name: {"tensors": n, "bytes": b}} for the memory plan (anything with qtype, nbytes)."""
    count, size = Counter(), Counter()
    for t in tensors.values():
        count[t.qtype.name] += 1
        size[t.qtype.name] += t.nbytes
    return {k: {"tensors": count[k], "bytes": size[k]} for k in sorted(count)}


_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    25: "IQ4_NL",
    30: "IQ4_XS",
    32: "BF16",
}


def file_type_name(ft) -> str:
    return _FILE_TYPES.get(ft, f"ftype{ft}" if ft is not None else "?")


def describe_file(arch: str, md: dict) -> str:
    """llama.cpp-style "<arch> <size label> <file type>" line."""
    size = md.get("general.size_label", "?")
    return f"{arch} {size} {file_type_name(md.get('general.file_type'))}"
