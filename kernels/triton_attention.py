"""Triton attention over the llmkit KV layout (decode, verify and prefill in one kernel).

q: [T, Hq, D]; k: [Hkv, S, D]; v: [Hkv, S, Dv] (fp16/fp32/bf16); kpos: int64 [S], the position
held by each cache slot (-1 = empty); qpos: int64 [T]. Key slot s is visible to query t iff
kpos[s] >= 0 and kpos[s] <= qpos[t] and qpos[t] - kpos[s] < window (causal + sliding window).
GQA: query head h reads kv head h // (Hq / Hkv). K and V may also be the cache's ggml blocks,
dequantized in the kernel: q8_0 (k: uint8 [Hkv, S, D/32 * 34], blocks of fp16 d + 32 int8) or q4_0
(uint8 [Hkv, S, D/32 * 18], fp16 d + 16 bytes of nibbles, value (nibble - 8) * d), so a
quantized cache is read at 8.5 / 4.5 bits per element. Paged (block-table) addressing: with
`block_table` [ceil(S / page)], logical slot s is row block_table[s // page] * page + s % page of
k/v [Hkv, pool rows, ...] (vLLM-style paged KV; the server's pool layout). Returns [T, Hq * Dv] in q's dtype, like
``llmkit.core.layers.attention`` (a query that sees no key gets zeros there, NaN in SDPA).

One program owns BLOCK_T queries x all GROUP = Hq / Hkv heads of one kv head (so K/V tiles are
read once per group, and decode still gets GROUP rows per tile), and streams the S slots in
tiles of BLOCK_S with an fp32 online softmax. A tile in which no (query, slot) pair is visible
is skipped after reading only its kpos (no K/V bytes, no flops).

Per call: bytes <= Hkv * S * (D + Dv) * esize * ceil(T / BLOCK_T) (K/V; esize 2 for f16, 34/32
for q8_0, 18/32 for q4_0; fewer when tiles are
skipped) + T * Hq * (D + Dv) * esize (q, out) + 8 * (S + T);
          flops ~= 2 * T * Hq * S_visible_tiles * (D + Dv).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmkit.errors import LlmkitError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 62
KV_KINDS = {None: 0, "q8_0": 1, "q4_0": 2}  # float tensor, or ggml blocks dequantized in-kernel
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}  # bytes per 32 elements


@triton.jit
def _kv_tile(base, row, d, mask, stride_d, KIND: tl.constexpr):
    """fp32 tile of K or V elements (row offset `row` [bytes or elements], element index d)."""
    if KIND == 0:
        return tl.load(base + row + d * stride_d, mask=mask, other=0.0).to(tl.float32)
    BB: tl.constexpr = 34 if KIND == 1 else 18
    blk = base + row + (d // 32) * BB  # the block's fp16 scale, little-endian, 2-byte aligned
    lo = tl.load(blk, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(blk + 1, mask=mask, other=0).to(tl.uint16)
    scale = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    j = d % 32
    if KIND == 1:
        q = tl.load(blk + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    else:
        b = tl.load(blk + 2 + j % 16, mask=mask, other=0)
        q = tl.where(j < 16, b & 0xF, b >> 4).to(tl.float32) - 8.0
    return q * scale


# out[t, h, :] = softmax(scale * q[t, h] . k[h // GROUP, s]) over visible s, @ v[h // GROUP]
#   q_ptr: [T, Hq, D], strides (sqt, sqh, sqd); k_ptr: [Hkv, S, D], strides (skh, sks, skd)
#   v_ptr: [Hkv, S, DV], strides (svh, svs, svd); o_ptr: [T, Hq, DV], strides (sot, soh, sod)
#   kpos_ptr: int64 [S] (contiguous); qpos_ptr: int64 [T] (contiguous)
#   T, S, D, DV: sizes; window: int64 (huge = none); qk_scale: softmax scale * log2(e)
#   GROUP: Hq / Hkv; GP: next pow2 of GROUP; BLOCK_T * GP rows per program;
#   BLOCK_S: slots per tile; BLOCK_D / BLOCK_DV: pow2 >= D / DV;
#   F32_MATH: cast q/k/v to fp32 at load (fp32 and bf16 inputs; ieee dots), else fp16 dots
#   K_KIND / V_KIND: 0 float, 1 q8_0, 2 q4_0 (then k/v are uint8 rows, sks/svs in bytes)
#   SPLIT: grid axis 2 splits the slots (s_per each); o_ptr / ml_ptr are fp32 partial buffers
#   PAGED: slot s lives in pool row bt[s // PAGE] * PAGE + s % PAGE (bt_ptr: int32/64 block table)
# grid: (cdiv(T, BLOCK_T), Hkv)
@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    kpos_ptr,
    qpos_ptr,
    bt_ptr,
    ml_ptr,
    s_per,
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
    K_KIND: tl.constexpr = 0,
    V_KIND: tl.constexpr = 0,
    PAGED: tl.constexpr = False,
    PAGE: tl.constexpr = 1,
    SPLIT: tl.constexpr = False,
):
    pid_t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)  # split-KV: this program covers slots [split * s_per, + s_per)
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

    s_end = tl.minimum(S, (split + 1) * s_per)  # s_per is a multiple of BLOCK_S
    for s0 in range(split * s_per, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        kpos = tl.load(kpos_ptr + offs_s, mask=offs_s < S, other=-1)  # [BLOCK_S]
        diff = qpos[:, None] - kpos[None, :]
        vis = (kpos[None, :] >= 0) & (diff >= 0) & (diff < window) & rmask[:, None]
        if tl.max(vis.to(tl.int32)) > 0:  # skip tiles no query of this program can see
            smask = offs_s < S
            if PAGED:  # logical slot -> its block's physical row in the pool
                blk = tl.load(bt_ptr + offs_s // PAGE, mask=smask, other=0).to(tl.int64)
                rows = blk * PAGE + offs_s % PAGE
            else:
                rows = offs_s.to(tl.int64)
            kmask = smask[None, :] & (offs_d[:, None] < D)
            if K_KIND != 0:  # [BLOCK_D, BLOCK_S] dequantized from the ggml blocks
                kt = _kv_tile(k_base, rows[None, :] * sks, offs_d[:, None], kmask, skd, K_KIND)
                sc = tl.dot(q.to(tl.float32), kt, input_precision="ieee")
            else:
                kp = k_base + rows[None, :] * sks + offs_d[:, None] * skd  # [BLOCK_D, BLOCK_S]
                kt = tl.load(kp, mask=kmask, other=0.0)
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
            vmask = smask[:, None] & (offs_dv[None, :] < DV)
            if V_KIND != 0:  # [BLOCK_S, BLOCK_DV]
                vt = _kv_tile(v_base, rows[:, None] * svs, offs_dv[None, :], vmask, svd, V_KIND)
                acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            elif F32_MATH:
                vp = v_base + rows[:, None] * svs + offs_dv[None, :] * svd  # [BLOCK_S, BLOCK_DV]
                vt = tl.load(vp, mask=vmask, other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                vp = v_base + rows[:, None] * svs + offs_dv[None, :] * svd
                vt = tl.load(vp, mask=vmask, other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new

    op = o_ptr + t[:, None].to(tl.int64) * sot + h[:, None] * soh + offs_dv[None, :] * sod
    omask = rmask[:, None] & (offs_dv[None, :] < DV)
    if SPLIT:  # partial results: unnormalised acc [split, T, Hq, DV], (m, l) [split, T, Hq, 2]
        tl.store(op + split.to(tl.int64) * T * sot, acc, mask=omask)
        mlp = ml_ptr + ((split.to(tl.int64) * T + t) * (GROUP * tl.num_programs(1)) + h) * 2
        tl.store(mlp, m_i, mask=rmask)
        tl.store(mlp + 1, l_i, mask=rmask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(op, out.to(o_ptr.dtype.element_ty), mask=omask)


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
    k_type: str | None = None,
    v_type: str | None = None,
    block_table: torch.Tensor | None = None,
    page: int = 0,
    n_slots: int | None = None,
    n_split: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k [Hkv, S, D], v [Hkv, S, Dv], kpos int [S] (-1 = empty), qpos int [T]
    -> [T, Hq * Dv] in q's dtype. window: sliding window length (None/0 = none).
    k_type / v_type "q8_0" | "q4_0": k / v are the cache's uint8 block rows [Hkv, S, bytes].
    block_table (int [n_pages]) + page: k / v are a pool [Hkv, rows, ...] and the n_slots logical
    slots (kpos [n_slots]) live in the pages the table lists. n_split: split-KV (slots divided
    among n_split programs per head group, merged by their softmax statistics); default: split
    on a GPU when a decode-sized batch over a long cache would leave most SMs idle."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise LlmkitError(
            f"attention wants q [T, Hq, D], k/v [Hkv, S, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, kind in (("k_type", k_type), ("v_type", v_type)):
        if kind not in KV_KINDS:
            raise LlmkitError(f"triton attention: unsupported {name} {kind!r} (q8_0, q4_0)")
    T, Hq, D = q.shape
    Hkv, S = k.shape[:2]
    paged = block_table is not None
    if paged:
        S = _check_pages(block_table, page, n_slots, k.shape[1], v.shape[1], q.device)
    Dk = _elements(k, k_type, "k")
    Dv = _elements(v, v_type, "v")
    if Dk != D or v.shape[0] != Hkv or (not paged and v.shape[1] != S):
        raise LlmkitError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise LlmkitError(f"{Hq} query heads is not a multiple of {Hkv} kv heads")
    for name, a, kind in (("q", q, None), ("k", k, k_type), ("v", v, v_type)):
        if kind is None and a.dtype not in _DTYPES:
            raise LlmkitError(f"triton attention: {name} must be fp32/fp16/bf16, got {a.dtype}")
    if k_type is None and v_type is None and k.dtype != v.dtype:
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
    f32_math = not (q.dtype == k.dtype == v.dtype == torch.float16)
    programs = triton.cdiv(T, block_t) * Hkv
    if n_split is None:
        n_split = 1 if interp else _auto_split(programs, S, q.device)
    n_split = max(1, min(int(n_split), triton.cdiv(S, block_s)))
    s_per = triton.cdiv(triton.cdiv(S, n_split), block_s) * block_s
    n_split = triton.cdiv(S, s_per) if S else 1
    split = n_split > 1
    if split:  # fp32 partials, merged below
        part = torch.empty((n_split, T, Hq, Dv), dtype=torch.float32, device=q.device)
        ml = torch.empty((n_split, T, Hq, 2), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, block_t), Hkv, n_split)
    _attn_kernel[grid](
        q,
        k,
        v,
        part[0] if split else out,
        kpos,
        qpos,
        block_table if paged else kpos,  # unused when not paged
        ml if split else kpos,  # unused when not split
        s_per if split else max(S, 1),
        T,
        S,
        D,
        Dv,
        win,
        float(scale) * _LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *(part[0] if split else out).stride(),
        GROUP=group,
        GP=gp,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        F32_MATH=f32_math,
        K_KIND=KV_KINDS[k_type],
        V_KIND=KV_KINDS[v_type],
        PAGED=paged,
        PAGE=page if paged else 1,
        SPLIT=split,
    )
    if split:  # softmax merge: weights 2^(m_i - max m), empty splits (m = -inf) weigh 0
        m, l = ml[..., 0], ml[..., 1]  # [n_split, T, Hq]
        m_max = m.amax(0)
        w = torch.exp2(m - torch.where(torch.isinf(m_max), 0.0, m_max))
        den = (w * l).sum(0)
        num = (w[..., None] * part).sum(0)
        out.copy_(num / torch.where(den > 0, den, 1.0)[..., None])
    return out.reshape(T, Hq * Dv)


def _auto_split(programs: int, S: int, device: torch.device) -> int:
    """Enough splits to give every SM ~2 programs, each over >= 512 slots (decode, long cache)."""
    if device.type != "cuda" or S < 2048:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(S // 512, (2 * sms) // max(programs, 1)))


def _elements(x: torch.Tensor, kind: str | None, name: str) -> int:
    """Elements per head vector of a float tensor or of uint8 ggml block rows."""
    if kind is None:
        return x.shape[2]
    bb = _BLOCK_BYTES[kind]
    if x.dtype != torch.uint8 or x.shape[2] % bb or x.stride(2) != 1:
        raise LlmkitError(
            f"triton attention: {name} as {kind} must be uint8 rows of {bb}-byte blocks "
            f"(contiguous last dim), got {x.dtype} {tuple(x.shape)}"
        )
    return x.shape[2] // bb * 32


def _check_pages(bt: torch.Tensor, page: int, n_slots, k_rows: int, v_rows: int, device) -> int:
    """Validate a block table; returns the number of logical slots."""
    if n_slots is None or page < 1 or page & (page - 1):
        raise LlmkitError("paged attention needs n_slots and a power-of-two page size")
    if bt.dim() != 1 or bt.is_floating_point() or bt.device != device:
        raise LlmkitError("block_table must be a 1-D integer tensor on the attention device")
    if bt.numel() * page < n_slots:
        raise LlmkitError(f"block table of {bt.numel()} pages cannot hold {n_slots} slots")
    # bounds are checked on CPU only: on a GPU the check would sync every call (the caller owns it)
    if bt.device.type == "cpu" and bt.numel():
        if int(bt.min()) < 0 or (int(bt.max()) + 1) * page > min(k_rows, v_rows):
            raise LlmkitError("block table points outside the K/V pool")
    return n_slots
