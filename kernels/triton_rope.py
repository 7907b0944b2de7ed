"""Triton RoPE: rotate the first n_rot dims of every head of x [T, H, D] in one launch.

NORM mode (llama): adjacent pairs (2i, 2i+1) rotate by theta_i. NEOX mode (gemma3, step35): the
pairs are (i, i + n_rot/2). Dims >= n_rot pass through (partial rotation). cos/sin: [T, n_rot/2]
fp32 rows (core.layers.rope_cache). One program per (token, block of heads), fp32 math.
Per call: bytes = 2 * T * H * D * esize (x in, out) + 8 * T * n_rot / 2 (cos, sin); flops ~ 6 per
rotated pair. It replaces 3 (NORM: complex build, multiply, view) to 7 (NEOX: two cats, a negated
cat, two multiplies, an add, and a cat for the tail) torch launches per call on a GPU, where a
graph-replayed decode step is dominated by such small kernels (docs/BENCHMARKS.md).
Reference: llmkit.core.layers.apply_rope's torch path; tests run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkit.errors import LlmkitError

ROPE_NORM, ROPE_NEOX = 0, 2  # ggml rope modes (the same codes as core.layers)


# out[t, h, :] = rope(x[t, h, :])
#   x_ptr: [T, H, D] (strides sxt, sxh; unit dim stride); o_ptr: [T, H, D] contiguous
#   c_ptr, s_ptr: [T, HALF] fp32 contiguous (cos, sin)
#   MODE: ROPE_NORM | ROPE_NEOX; HALF: n_rot / 2; BLOCK_HALF >= HALF, BLOCK_D >= D (pow2)
# grid: (T, cdiv(H, BLOCK_H))
@triton.jit
def _rope_kernel(
    x_ptr,
    c_ptr,
    s_ptr,
    o_ptr,
    H,
    D,
    HALF,
    sxt,
    sxh,
    MODE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    i = tl.arange(0, BLOCK_HALF)[None, :]  # pair index [1, BHALF]
    hm = h < H
    pm = hm & (i < HALF)
    c = tl.load(c_ptr + t * HALF + i, mask=i < HALF, other=0.0)
    s = tl.load(s_ptr + t * HALF + i, mask=i < HALF, other=0.0)
    if MODE == 0:  # NORM: (2i, 2i + 1)
        ia, ib = 2 * i, 2 * i + 1
    else:  # NEOX: (i, i + HALF)
        ia, ib = i, i + HALF
    xr = x_ptr + t * sxt + h.to(tl.int64) * sxh
    orow = o_ptr + (t * H + h.to(tl.int64)) * D
    a = tl.load(xr + ia, mask=pm, other=0.0).to(tl.float32)
    b = tl.load(xr + ib, mask=pm, other=0.0).to(tl.float32)
    tl.store(orow + ia, (a * c - b * s).to(o_ptr.dtype.element_ty), mask=pm)
    tl.store(orow + ib, (a * s + b * c).to(o_ptr.dtype.element_ty), mask=pm)
    # the unrotated tail (partial rotation): dims 2 * HALF .. D - 1
    d = tl.arange(0, BLOCK_D)[None, :]
    tm = hm & (d >= 2 * HALF) & (d < D)
    tail = tl.load(xr + d, mask=tm, other=0.0)
    tl.store(orow + d, tail.to(o_ptr.dtype.element_ty), mask=tm)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int) -> torch.Tensor:
    """x [T, H, D] (any strides with a unit last one), cos/sin [T, n_rot/2] -> a new [T, H, D]
    tensor of x's dtype: the first n_rot dims of each head rotated, the rest copied."""
    if mode not in (ROPE_NORM, ROPE_NEOX):
        raise LlmkitError(f"triton rope: unknown mode {mode}")
    if x.dim() != 3 or cos.dim() != 2 or cos.shape != sin.shape:
        raise LlmkitError(
            f"triton rope wants x [T, H, D] and cos/sin [T, n_rot/2]; got {tuple(x.shape)}, "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    T, H, D = x.shape
    half = cos.shape[1]
    if cos.shape[0] != T or 2 * half > D:
        raise LlmkitError(f"cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
    if x.stride(2) != 1:
        x = x.contiguous()
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_h = min(16, triton.next_power_of_2(H))
    grid = (T, triton.cdiv(H, block_h))
    _rope_kernel[grid](
        x,
        cos,
        sin,
        out,
        H,
        D,
        half,
        x.stride(0),
        x.stride(1),
        MODE=mode,
        BLOCK_H=block_h,
        BLOCK_HALF=max(triton.next_power_of_2(half), 1),
        BLOCK_D=triton.next_power_of_2(D),
    )
    return out
