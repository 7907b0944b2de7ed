"""Stateless building blocks shared by the architectures: norms, RoPE, attention, activations.

All math in fp32 (llama.cpp's CPU backend keeps activations in fp32 between ops).
Shapes: T = tokens in the batch, H = heads, D = head dim, S = key slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROPE_NORM, ROPE_NEOX = 0, 2  # ggml rope modes: adjacent pairs vs split halves


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # x: [..., n]; weight: [n] (GGUF norms already include Gemma's +1). One fused op: the decode
    # step is dominated by per-op overhead on small models.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_cache(
    pos: torch.Tensor, n_rot: int, base: float, freq_scale: float = 1.0, factors=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, n_rot/2] for theta_i = freq_scale * p * base^(-2i/n_rot) / factor_i."""
    i = torch.arange(n_rot // 2, dtype=torch.float64)
    inv = base ** (-2.0 * i / n_rot)
    if factors is not None:
        inv = inv / factors[: n_rot // 2].double()
    theta = pos.double()[:, None] * (inv * freq_scale)[None, :]
    return torch.cos(theta).float(), torch.sin(theta).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int) -> torch.Tensor:
    """x: [T, H, D]; rotates the first n_rot = 2*cos.shape[-1] dims, passes the rest through."""
    half = cos.shape[-1]
    n_rot = 2 * half
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, n_rot/2]
    if mode == ROPE_NEOX:
        x0, x1 = rot[..., :half], rot[..., half:]
        out = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    else:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
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
