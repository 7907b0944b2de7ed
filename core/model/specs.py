"""The name/shape contract of an architecture's weights as data, without torch: `TensorSpec`s,
the tables every architecture builds them from (trunk, blocks, NextN blocks), and the check
against a GGUF file that fails with one line naming the first missing, unexpected, wrongly
shaped or unsupported tensor. core/model/weights.py wraps the checked tensors for the torch
path, core/lean/ for the torch-free one.
"""

from __future__ import annotations

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
