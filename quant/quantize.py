"""ggml block quantizers in vectorized torch, byte-identical to ggml's reference (`quantize_row_*_ref`,
as ported by gguf-py): used for the quantized KV cache today, by `llm quantize` later.

Q8_0 (32 values -> 34 bytes): d = max|x| / 127 (stored fp16), q = round-half-away(x / d) as int8.
Q4_0 (32 values -> 18 bytes): m = the value of largest magnitude (signed), d = m / -8 (fp16),
q = min(15, trunc(x / d + 8.5)); byte j holds q_j (low nibble) and q_{j+16} (high nibble).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.errors import LlmkitError

BLOCK = 32


def _roundf(x: torch.Tensor) -> torch.Tensor:
    # C roundf (half away from zero), written like gguf-py so float edge cases agree
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise LlmkitError(
            f"cannot quantize rows of {x.shape[-1]} values: not a multiple of {BLOCK}"
        )
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)  # [..., nb, 32]


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).view(torch.uint8)  # [..., nb, 2] little-endian


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    b = _blocks(x)
    d = b.abs().amax(-1, keepdim=True) / 127  # [..., nb, 1]
    q = _roundf(b * _inv(d)).to(torch.int8).view(torch.uint8)  # [..., nb, 32]
    out = torch.cat((_fp16_bytes(d), q), dim=-1)  # [..., nb, 34]
    return out.reshape(*x.shape[:-1], -1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    b = _blocks(x)
    imax = b.abs().argmax(-1, keepdim=True)
    d = torch.gather(b, -1, imax) / -8  # [..., nb, 1]
    q = torch.trunc(b * _inv(d) + 8.5).clamp(0, 15).to(torch.uint8)  # [..., nb, 32]
    packed = q[..., :16] | (q[..., 16:] << 4)  # [..., nb, 16]
    out = torch.cat((_fp16_bytes(d), packed), dim=-1)  # [..., nb, 18]
    return out.reshape(*x.shape[:-1], -1)


QUANTIZERS = {QT.Q8_0: quantize_q8_0, QT.Q4_0: quantize_q4_0}


def quantize(x: torch.Tensor, qtype: QT) -> torch.Tensor:
    """x: [..., n] float -> uint8 [..., n / 32 * type_size] in ggml block layout."""
    fn = QUANTIZERS.get(qtype)
    if fn is None:
        raise LlmkitError(
            f"no quantizer for {qtype.name} (supported: {', '.join(q.name for q in QUANTIZERS)})"
        )
    return fn(x)
