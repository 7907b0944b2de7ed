"""Triton fusions for the small per-token ops around the matmuls (decode of small models is
dominated by launches, not bytes): RMSNorm with an optional residual add, and the gated FFN
activations SwiGLU / GeGLU (tanh).

rms_norm:  x [M, n] (+ r [M, n]) -> (s = x + r, y = s / sqrt(mean(s^2) + eps) * w); one program per
           row, fp32 math. Bytes per call: M * n * 4 * (2 + 2 with a residual) + n * 4; one launch
           instead of 2 (add + norm) or 1 (F.rms_norm).
glu:       gu [M, 2F] (gate | up halves) -> act(gate) * up [M, F]; one program per (row, F tile).
           Bytes: 12 * M * F; one launch instead of 3 (chunk is free, act, mul).
Reference: llmkit.core.layers (rms_norm, silu, gelu_tanh); tests run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkit.errors import LlmkitError

ACT_SILU, ACT_GELU_TANH = 0, 1
_ACTS = {"silu": ACT_SILU, "gelu_tanh": ACT_GELU_TANH}


# s = x (+ r); y = s * rsqrt(mean(s^2) + eps) * w
#   x_ptr, r_ptr, s_ptr, y_ptr: [M, N] fp32 rows (row strides sx, sr, ss, sy; unit column stride)
#   w_ptr: [N] fp32 (HAS_W false: no weight); HAS_R: add the residual r and store s
# grid: (M,)
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    sx,
    sr,
    ss,
    sy,
    eps,
    HAS_R: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    s = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        s += tl.load(r_ptr + row * sr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * ss + offs, s, mask=m)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    y = s * inv
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + offs, y, mask=m)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
):
    """y = rms_norm(x (+ residual)) * weight over the last dim. Returns y, or (x + residual, y)
    when a residual is given (the new residual stream and its normed copy, in one pass)."""
    if x.dtype != torch.float32 or (residual is not None and residual.shape != x.shape):
        raise LlmkitError("triton rms_norm wants fp32 x and a residual of the same shape")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else y
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    w = weight if weight is not None else x2
    if weight is not None and weight.shape != (n,):
        raise LlmkitError(f"rms_norm weight must be [{n}], got {tuple(weight.shape)}")
    if M:
        _rms_norm_kernel[(M,)](
            x2,
            r2,
            w,
            s,
            y,
            n,
            x2.stride(0),
            r2.stride(0),
            s.stride(0),
            y.stride(0),
            float(eps),
            HAS_R=residual is not None,
            HAS_W=weight is not None,
            BLOCK=triton.next_power_of_2(n),
        )
    y = y.reshape(x.shape)
    return (s.reshape(x.shape), y) if residual is not None else y


# out = act(gu[:, :F]) * gu[:, F:]
#   gu_ptr: [M, 2F] fp32, row stride sg; o_ptr: [M, F], row stride so
#   ACT: ACT_SILU (x * sigmoid(x)) or ACT_GELU_TANH (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))))
# grid: (M, cdiv(F, BLOCK))
@triton.jit
def _glu_kernel(gu_ptr, o_ptr, F, sg, so, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F
    g = tl.load(gu_ptr + row * sg + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * sg + F + offs, mask=m, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        # tanh(z) = 2 sigmoid(2z) - 1; |z| > 15 is +-1 in fp32 (the clamp avoids exp overflow)
        z = tl.minimum(tl.maximum(0.7978845608028654 * (g + 0.044715 * g * g * g), -15.0), 15.0)
        a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))
    tl.store(o_ptr + row * so + offs, a * u, mask=m)


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up [..., 2F] (gate half then up half, as the fused matmul returns them) ->
    act(gate) * up [..., F] fp32. act: "silu" or "gelu_tanh"."""
    code = _ACTS.get(act)
    if code is None:
        raise LlmkitError(f"unknown GLU activation {act!r} (supported: {', '.join(_ACTS)})")
    if gate_up.dtype != torch.float32 or gate_up.shape[-1] % 2:
        raise LlmkitError("triton glu wants fp32 input with an even last dim")
    f = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * f)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    M = gu.shape[0]
    out = torch.empty((M, f), dtype=torch.float32, device=gu.device)
    block = min(1024, triton.next_power_of_2(max(f, 1)))
    if M and f:
        _glu_kernel[(M, triton.cdiv(f, block))](
            gu, out, f, gu.stride(0), out.stride(0), ACT=code, BLOCK=block
        )
    return out.reshape(*gate_up.shape[:-1], f)
