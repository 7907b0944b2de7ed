"""Triton attention over the llmkit KV layout (decode, verify and prefill in one kernel).

q: [T, Hq, D]; k: [Hkv, S, D]; v: [Hkv, S, Dv] (fp16/fp32/bf16); kpos: int64 [S], the position
held by each cache slot (-1 = empty); qpos: int64 [T]. Key slot s is visible to query t iff
kpos[s] >= 0 and kpos[s] <= qpos[t] and qpos[t] - kpos[s] < window (causal + sliding window).
GQA: query head h reads kv head h // (Hq / Hkv). Returns [T, Hq * Dv] in q's dtype, like
``llmkit.core.layers.attention`` (a query that sees no key gets zeros there, NaN in SDPA).

One program owns BLOCK_T queries x all GROUP = Hq / Hkv heads of one kv head (so K/V tiles are
read once per group, and decode still gets GROUP rows per tile), and streams the S slots in
tiles of BLOCK_S with an fp32 online softmax. A tile in which no (query, slot) pair is visible
is skipped after reading only its kpos (no K/V bytes, no flops).

Per call: bytes <= Hkv * S * (D + Dv) * esize * ceil(T / BLOCK_T) (K/V, fewer when tiles are
skipped) + T * Hq * (D + Dv) * esize (q, out) + 8 * (S + T);
          flops ~= 2 * T * Hq * S_visible_tiles * (D + Dv).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmkit.core.errors import LlmkitError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 62


# out[t, h, :] = softmax(scale * q[t, h] . k[h // GROUP, s]) over visible s, @ v[h // GROUP]
#   q_ptr: [T, Hq, D], strides (sqt, sqh, sqd); k_ptr: [Hkv, S, D], strides (skh, sks, skd)
#   v_ptr: [Hkv, S, DV], strides (svh, svs, svd); o_ptr: [T, Hq, DV], strides (sot, soh, sod)
#   kpos_ptr: int64 [S] (contiguous); qpos_ptr: int64 [T] (contiguous)
#   T, S, D, DV: sizes; window: int64 (huge = none); qk_scale: softmax scale * log2(e)
#   GROUP: Hq / Hkv; GP: next pow2 of GROUP; BLOCK_T * GP rows per program;
#   BLOCK_S: slots per tile; BLOCK_D / BLOCK_DV: pow2 >= D / DV;
#   F32_MATH: cast q/k/v to fp32 at load (fp32 and bf16 inputs; ieee dots), else fp16 dots
# grid: (cdiv(T, BLOCK_T), Hkv)
@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    kpos_ptr,
    qpos_ptr,
    T,
    S,
    D,
    DV,
    window,
    qk_scale,
    sqt,
    sqh,
    sqd,
    skh,
    sks,
    skd,
    svh,
    svs,
    svd,
    sot,
    soh,
    sod,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    F32_MATH: tl.constexpr,
):
    pid_t = tl.program_id(0)
    kvh = tl.program_id(1)
    R: tl.constexpr = BLOCK_T * GP
    r = tl.arange(0, R)
    t = pid_t * BLOCK_T + r // GP  # query index of row r
    g = r % GP
    h = kvh * GROUP + g  # query head of row r
    rmask = (t < T) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    qp = q_ptr + t[:, None].to(tl.int64) * sqt + h[:, None] * sqh + offs_d[None, :] * sqd
    q = tl.load(qp, mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    if F32_MATH:
        q = q.to(tl.float32)
    qpos = tl.load(qpos_ptr + t, mask=rmask, other=-1)  # [R]; -1 sees nothing

    m_i = tl.full((R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((R,), dtype=tl.float32)
    acc = tl.zeros((R, BLOCK_DV), dtype=tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * skh
    v_base = v_ptr + kvh.to(tl.int64) * svh

    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        kpos = tl.load(kpos_ptr + offs_s, mask=offs_s < S, other=-1)  # [BLOCK_S]
        diff = qpos[:, None] - kpos[None, :]
        vis = (kpos[None, :] >= 0) & (diff >= 0) & (diff < window) & rmask[:, None]
        if tl.max(vis.to(tl.int32)) > 0:  # skip tiles no query of this program can see
            smask = offs_s < S
            kp = k_base + offs_s[None, :] * sks + offs_d[:, None] * skd  # [BLOCK_D, BLOCK_S]
            kt = tl.load(kp, mask=smask[None, :] & (offs_d[:, None] < D), other=0.0)
            if F32_MATH:
                kt = kt.to(tl.float32)
                sc = tl.dot(q, kt, input_precision="ieee")
            else:
                sc = tl.dot(q, kt)
            sc = tl.where(vis, sc * qk_scale, float("-inf"))  # [R, BLOCK_S], log2 domain
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(sc - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vp = v_base + offs_s[:, None] * svs + offs_dv[None, :] * svd  # [BLOCK_S, BLOCK_DV]
            vt = tl.load(vp, mask=smask[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if F32_MATH:
                acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    op = o_ptr + t[:, None].to(tl.int64) * sot + h[:, None] * soh + offs_dv[None, :] * sod
    tl.store(op, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & (offs_dv[None, :] < DV))


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kpos: torch.Tensor,
    qpos: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    *,
    block_s: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k [Hkv, S, D], v [Hkv, S, Dv], kpos int [S] (-1 = empty), qpos int [T]
    -> [T, Hq * Dv] in q's dtype. window: sliding window length (None/0 = none)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise LlmkitError(
            f"attention wants q [T, Hq, D], k/v [Hkv, S, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    T, Hq, D = q.shape
    Hkv, S, Dk = k.shape
    Dv = v.shape[2]
    if Dk != D or v.shape[:2] != (Hkv, S):
        raise LlmkitError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise LlmkitError(f"{Hq} query heads is not a multiple of {Hkv} kv heads")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.dtype not in _DTYPES:
            raise LlmkitError(f"triton attention: {name} must be fp32/fp16/bf16, got {a.dtype}")
    if k.dtype != v.dtype:
        raise LlmkitError(f"k is {k.dtype} but v is {v.dtype}")
    if kpos.shape != (S,) or qpos.shape != (T,):
        raise LlmkitError(f"kpos must be [{S}] and qpos [{T}]")
    if kpos.is_floating_point() or qpos.is_floating_point():
        raise LlmkitError("kpos / qpos must be integer tensors")
    if len({q.device, k.device, v.device, kpos.device, qpos.device}) != 1:
        raise LlmkitError("attention tensors are on different devices")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    win = _NO_WINDOW if not window else int(window)
    kpos = kpos.to(torch.int64).contiguous()
    qpos = qpos.to(torch.int64).contiguous()
    out = torch.empty((T, Hq, Dv), dtype=q.dtype, device=q.device)
    if T == 0 or Hq == 0 or Dv == 0:
        return out.reshape(T, Hq * Dv)

    group = Hq // Hkv
    gp = triton.next_power_of_2(group)
    interp = _interpreting()
    if block_t is None:
        # GPU tl.dot needs >= 16 rows; the interpreter likes few fat programs.
        block_t = max(max(16, 64 if interp else 16) // gp, 1)
        block_t = min(block_t, triton.next_power_of_2(T)) if interp else block_t
    if block_s is None:
        block_s = 64 if interp else (64 if D <= 128 else 32)
    # Both operands of each dot in one dtype: fp16 x fp16 on tensor cores, else fp32.
    f32_math = not (q.dtype == k.dtype == torch.float16)
    grid = (triton.cdiv(T, block_t), Hkv)
    _attn_kernel[grid](
        q,
        k,
        v,
        out,
        kpos,
        qpos,
        T,
        S,
        D,
        Dv,
        win,
        float(scale) * _LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        GROUP=group,
        GP=gp,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        F32_MATH=f32_math,
    )
    return out.reshape(T, Hq * Dv)
