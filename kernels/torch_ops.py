"""The PyTorch implementations of the small ops (any device): the CPU path and the reference the
Triton kernels are tested against. All math in fp32 (llama.cpp's CPU backend keeps activations in
fp32 between ops). Shapes: T = tokens in the batch, H = heads, D = head dim, S = key slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.kernels.rope import ROPE_NEOX


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # x: [..., n]; weight: [n] (GGUF norms already include Gemma's +1). One fused op: the decode
    # step is dominated by per-op overhead on small models.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int) -> torch.Tensor:
    """x: [T, H, D] fp32; rotates the first n_rot = 2*cos.shape[-1] dims, passes the rest through.

    NORM rotates adjacent pairs: as complex numbers that is one multiply (same products and sums
    as the real formula, so the same bits, in 3 ops instead of 8). NEOX rotates the two halves."""
    half = cos.shape[-1]
    n_rot = 2 * half
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    if mode == ROPE_NEOX:
        c = torch.cat((cos, cos), dim=-1)[:, None, :]  # [T, 1, n_rot]
        s = torch.cat((sin, sin), dim=-1)[:, None, :]
        out = rot * c + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * s
    else:
        pairs = torch.view_as_complex(rot.unflatten(-1, (half, 2)))  # [T, H, n_rot/2] complex
        out = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [T, Hq, D]; k: [Hkv, S, D]; v: [Hkv, S, Dv]; mask: [T, S] bool (True = visible).
    Returns [T, Hq * Dv]. GQA: query head h reads kv head h // (Hq / Hkv)."""
    T, Hq, _ = q.shape
    Hkv = k.shape[0]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, T, D]
        k[None].to(q.dtype),
        v[None].to(q.dtype),
        attn_mask=mask[None, None],
        scale=scale,
        enable_gqa=Hq != Hkv,
    )  # [1, Hq, T, Dv]
    return out[0].transpose(0, 1).reshape(T, -1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2F] (gate half | up half, as the fused gate/up matmul returns them) -> act(gate) * up.
    act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up
