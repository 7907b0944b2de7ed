"""Per-tensor type choice of `llm quantize`, following llama.cpp's `llama_tensor_get_type`
(src/llama-quant.cpp): which tensors are quantized at all, the `_S/_M/_L` mixes (more bits for
attn_v / ffn_down on the layers `use_more_bits` picks, Q6_K for the output / tied embeddings), and
the fallback when a row length is not a multiple of the block size.

Tensors are visited in llama.cpp's order (non-block tensors by name, then blocks by layer number,
names sorted within a block), because the attn_v counter that drives the mix increments per tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError

# llm quantize TYPE -> (llama.cpp ftype number, default tensor type)
FTYPES: dict[str, tuple[int, QT]] = {
    "Q4_0": (2, QT.Q4_0),
    "Q4_1": (3, QT.Q4_1),
    "Q5_0": (8, QT.Q5_0),
    "Q5_1": (9, QT.Q5_1),
    "Q8_0": (7, QT.Q8_0),
    "Q2_K": (10, QT.Q2_K),
    "Q3_K_S": (11, QT.Q3_K),
    "Q3_K_M": (12, QT.Q3_K),
    "Q3_K_L": (13, QT.Q3_K),
    "Q4_K_S": (14, QT.Q4_K),
    "Q4_K_M": (15, QT.Q4_K),
    "Q5_K_S": (16, QT.Q5_K),
    "Q5_K_M": (17, QT.Q5_K),
    "Q6_K": (18, QT.Q6_K),
    "IQ4_NL": (25, QT.IQ4_NL),
    "IQ4_XS": (30, QT.IQ4_XS),
    "F16": (1, QT.F16),
    "BF16": (32, QT.BF16),
}

_FALLBACK = {
    QT.IQ4_XS: QT.IQ4_NL,
    QT.Q2_K: QT.Q4_0,
    QT.Q3_K: QT.Q4_0,
    QT.Q4_K: QT.Q5_0,
    QT.Q5_K: QT.Q5_1,
    QT.Q6_K: QT.Q8_0,
}
_FLOAT = {QT.F32, QT.F16, QT.BF16}
_NO_QUANT = (
    "_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight", "position_embd",
    "token_types.weight", "time_mix_",
)  # fmt: skip


def parse_type(name: str) -> str:
    key = name.strip().upper()
    if key not in FTYPES:
        raise LlmkitError(f"unknown quantization type {name!r} (valid: {', '.join(FTYPES)})")
    return key


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(names) -> list[str]:
    """llama.cpp's weight_name_comparer: (layer or -1, name)."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def allows_quantization(name: str, n_dims: int) -> bool:
    if n_dims < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in _NO_QUANT)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return "attn_qkv" if key == "attn_qkv.weight" else cat
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


@dataclass
class ModelInfo:
    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool = False

    @classmethod
    def from_metadata(cls, md: dict) -> ModelInfo:
        arch = md.get("general.architecture", "")

        def first(key, default):
            v = md.get(f"{arch}.{key}", default)
            if hasattr(v, "__len__") and not isinstance(v, str):
                v = v[0] if len(v) else default
            return int(v)

        n_layer = first("block_count", 0)
        n_head = first("attention.head_count", 1)
        n_head_kv = first("attention.head_count_kv", n_head) or n_head
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_gqa=n_head // n_head_kv if n_head_kv else 1,
            n_expert=first("expert_count", 0),
            is_70b=arch == "llama" and n_layer == 80 and n_head != n_head_kv,
        )


def choose_types(
    tensors: dict[str, tuple[tuple[int, ...], QT]],
    ftype_name: str,
    info: ModelInfo,
    pure: bool = False,
    has_imatrix: bool = False,
) -> dict[str, QT]:
    """{name: (numpy shape, current type)} -> {name: target type}, as llama.cpp chooses them."""
    ftype, default = FTYPES[ftype_name]
    names = llama_order(tensors)
    n_attention_wv = sum(_category(n) in ("attn_v", "attn_qkv") for n in names)
    tied = "output.weight" not in tensors
    n_expert = max(1, info.n_expert)
    falcon = info.arch == "falcon"
    i_attn_v = i_ffn_down = 0
    out: dict[str, QT] = {}
    for name in names:
        shape, cur = tensors[name]
        # ggml_n_dims: trailing 1-sized dims do not count
        ne = list(reversed(shape))
        nd = len(ne)
        while nd > 1 and ne[nd - 1] == 1:
            nd -= 1
        if not allows_quantization(name, nd):
            out[name] = cur
            continue
        new = default
        if default not in _FLOAT:
            cat = _category(name)
            if not pure:
                new, i_attn_v, i_ffn_down = _mix(
                    name, cat, new, ftype_name, info, shape, tied, falcon, n_expert,
                    n_attention_wv, i_attn_v, i_ffn_down, has_imatrix,
                )  # fmt: skip
            block = GGML_QUANT_SIZES[new][0]
            if shape[-1] % block:
                fb = _FALLBACK.get(new)
                if fb is None:
                    raise LlmkitError(f"{name}: no fallback type for {new.name}")
                new = fb if shape[-1] % GGML_QUANT_SIZES[fb][0] == 0 else QT.F16
        out[name] = new
    return out


def _mix(name, cat, new, ft, info, shape, tied, falcon, n_expert, n_wv, i_wv, i_fd, has_imatrix):
    """llama_tensor_get_type_impl for the file types `llm quantize` offers."""
    nx = shape[-1]
    if cat == "output" or (tied and cat == "token_embd"):
        if falcon or nx % GGML_QUANT_SIZES[new][0]:
            return QT.Q8_0, i_wv, i_fd
        return (QT.Q6_K if new != QT.Q8_0 else new), i_wv, i_fd
    if cat == "token_embd":
        return new, i_wv, i_fd
    if cat in ("attn_v", "attn_qkv") and (cat == "attn_v" or "attn_kv_b" in name):
        gqa = info.n_gqa
        if ft == "Q2_K":
            new = QT.Q4_K if gqa >= 4 else QT.Q3_K
        elif ft == "Q3_K_M":
            new = QT.Q5_K if i_wv < 2 else QT.Q4_K
        elif ft == "Q3_K_L":
            new = QT.Q5_K
        elif ft in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new = QT.Q5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_wv, n_wv):
            new = QT.Q6_K
        elif ft == "Q4_K_S" and i_wv < 4:
            new = QT.Q5_K
        if info.is_70b and new in (QT.Q3_K, QT.Q4_K):
            new = QT.Q5_K
        if info.n_expert == 8:
            new = QT.Q8_0
        return new, i_wv + 1, i_fd
    if cat == "attn_qkv":
        if ft in ("Q3_K_M", "Q3_K_L"):
            new = QT.Q4_K
        elif ft == "Q4_K_M":
            new = QT.Q5_K
        elif ft == "Q5_K_M":
            new = QT.Q6_K
        return new, i_wv, i_fd
    if cat == "attn_k":
        return (QT.Q8_0 if info.n_expert == 8 else new), i_wv, i_fd
    if cat == "ffn_down":
        i_layer, n_layer = i_fd, info.n_layer
        if n_expert > 1:
            i_layer = layer_of(name)
            if not 0 <= i_layer < n_layer:
                raise LlmkitError(f"bad layer {i_layer} for tensor {name}")
        if ft == "Q2_K":
            new = QT.Q3_K
        elif ft == "Q3_K_M":
            new = (
                QT.Q5_K
                if i_layer < n_layer // 16
                else QT.Q4_K
                if not falcon or use_more_bits(i_layer, n_layer)
                else QT.Q3_K
            )
        elif ft == "Q3_K_L":
            new = QT.Q4_K if falcon else QT.Q5_K
        elif ft == "Q4_K_M":
            if falcon:
                new = (
                    QT.Q6_K
                    if i_layer < n_layer // 16
                    else QT.Q5_K
                    if use_more_bits(i_layer, n_layer)
                    else QT.Q4_K
                )
            elif use_more_bits(i_layer, n_layer):
                new = QT.Q6_K
        elif i_layer < n_layer // 8 and ft in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
            new = QT.Q5_K
        elif ft == "Q5_K_M" and use_more_bits(i_layer, n_layer):
            new = QT.Q6_K
        elif ft == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new = QT.Q5_K
        elif ft in ("Q4_0", "Q5_0") and has_imatrix and i_layer < n_layer // 8:
            new = QT.Q4_1 if ft == "Q4_0" else QT.Q5_1
        return new, i_wv, i_fd + 1
    if cat == "attn_output":
        if not falcon:
            if info.n_expert == 8:
                if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    new = QT.Q5_K
            elif ft == "Q2_K":
                new = QT.Q3_K
            elif ft == "Q3_K_M":
                new = QT.Q4_K
            elif ft == "Q3_K_L":
                new = QT.Q5_K
        elif ft == "Q3_K_L":
            new = QT.Q4_K
        return new, i_wv, i_fd
    return new, i_wv, i_fd
