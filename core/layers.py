"""Stateless building blocks shared by the architectures: norms, RoPE, attention, activations.

All math in fp32 (llama.cpp's CPU backend keeps activations in fp32 between ops).
Shapes: T = tokens in the batch, H = heads, D = head dim, S = key slots.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

ROPE_NORM, ROPE_NEOX = 0, 2  # ggml rope modes: adjacent pairs vs split halves


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # x: [..., n]; weight: [n] (GGUF norms already include Gemma's +1). One fused op: the decode
    # step is dominated by per-op overhead on small models.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_POS_BOUND: list[int] = []  # innermost positions_below() bound, if any
_RETIRED_TABLES: list = []  # tables outgrown by a longer context (doubling: <= the live size)
_FACTOR_KEYS: dict[int, tuple] = {}  # id(live factors tensor) -> its values


@contextlib.contextmanager
def positions_below(n: int):
    """Promise that positions in this block are < n, so rope_cache sizes its table from n
    instead of reading pos.max() back from the device (a CUDA-graph capture cannot)."""
    _POS_BOUND.append(n)
    try:
        yield
    finally:
        _POS_BOUND.pop()


def rope_cache(
    pos: torch.Tensor, n_rot: int, base: float, freq_scale: float = 1.0, factors=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, n_rot/2] for theta_i = freq_scale * p * base^(-2i/n_rot) / factor_i.

    Rows come from a per-configuration table of all positions so far (grown by doubling): a decode
    step indexes it instead of evaluating cos/sin (the values are the same elementwise formula)."""
    fkey = None if factors is None else _factors_key(factors)
    key = (n_rot, float(base), float(freq_scale), fkey, pos.device)
    if _POS_BOUND:
        n_need = _POS_BOUND[-1]
    else:
        n_need = int(pos.max()) + 1 if pos.numel() else 1
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < n_need:
        n = max(1024, 1 << (n_need - 1).bit_length())
        i = torch.arange(n_rot // 2, dtype=torch.float64, device=pos.device)
        inv = base ** (-2.0 * i / n_rot)
        if factors is not None:
            inv = inv / factors[: n_rot // 2].double().to(pos.device)
        p = torch.arange(n, dtype=torch.float64, device=pos.device)
        theta = p[:, None] * (inv * freq_scale)[None, :]
        if key in _ROPE_TABLES:  # a captured CUDA graph may still index the smaller table
            _RETIRED_TABLES.append(_ROPE_TABLES[key])
        table = _ROPE_TABLES[key] = (torch.cos(theta).float(), torch.sin(theta).float())
    return table[0][pos], table[1][pos]


def _factors_key(factors: torch.Tensor) -> tuple:
    """The factors' values, read from the device once per tensor (a CUDA-graph capture cannot
    read them back, and an address could be reused by another model's tensor)."""
    k = _FACTOR_KEYS.get(id(factors))
    if k is None:
        k = _FACTOR_KEYS[id(factors)] = tuple(factors.tolist())
        weakref.finalize(factors, _FACTOR_KEYS.pop, id(factors), None)  # before id reuse
    return k


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int) -> torch.Tensor:
    """x: [T, H, D] fp32; rotates the first n_rot = 2*cos.shape[-1] dims, passes the rest through.

    NORM rotates adjacent pairs: as complex numbers that is one multiply (same products and sums
    as the real formula, so the same bits, in 3 ops instead of 8). NEOX rotates the two halves.
    On a GPU, NEOX is one Triton launch (kernels/triton_rope.py) instead of ~7 torch kernels; NORM
    stays on its 2 torch kernels, which measured faster than the Triton one in a graph-replayed
    step on an H100 (1.83 against 1.92 ms per step of a 1.1B llama, docs/BENCHMARKS.md)."""
    if x.is_cuda and mode == ROPE_NEOX:
        from llmkit.kernels.triton_rope import rope

        return rope(x, cos, sin, mode)
    return apply_rope_torch(x, cos, sin, mode)


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int):
    """apply_rope in torch ops on any device (the CPU path, and the Triton kernel's reference)."""
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


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual step and the next norm: (s, rms_norm(s)) with s = x + r. On a GPU one fused
    Triton launch (kernels/triton_fused.py); on CPU the two torch ops (the same bits as before)."""
    if x.is_cuda:
        from llmkit.kernels.triton_fused import rms_norm as fused

        return fused(x, weight, eps, residual=r)
    s = x + r
    return s, rms_norm(s, weight, eps)


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2F] (gate half | up half, as the fused gate/up matmul returns them) -> act(gate) * up.
    act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU). One Triton launch on a GPU."""
    if gate_up.is_cuda:
        from llmkit.kernels.triton_fused import glu as fused

        return fused(gate_up, act)
    gate, up = gate_up.chunk(2, dim=-1)
    return (silu(gate) if act == "silu" else gelu_tanh(gate)) * up
