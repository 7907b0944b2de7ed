"""K-quant block quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in vectorized torch, byte-identical to
ggml's `quantize_row_*_ref` (the path `ggml_quantize_chunk` takes without an importance matrix), plus
the importance-weighted `quantize_row_*_impl` variants llama.cpp uses when given an imatrix.

A super-block holds QK_K = 256 values (byte offsets, little-endian, f16 = IEEE half):

    Q2_K  84 B: scales[16] @0 (low nibble: scale, high: min) | qs[64] @16 | d @80 | dmin @82
    Q3_K 110 B: hmask[32] @0 | qs[64] @32 | scales[12] @96 (16 x 6-bit, offset 32) | d @108
    Q4_K 144 B: d @0 | dmin @2 | scales[12] @4 (8 x (6-bit scale, 6-bit min)) | qs[128] @16
    Q5_K 176 B: d @0 | dmin @2 | scales[12] @4 | qh[32] @16 | qs[128] @48
    Q6_K 210 B: ql[128] @0 | qh[64] @128 | scales:i8[16] @192 | d @208

How byte-exactness is kept: every search (`make_qkx2_quants`, `make_qx_quants`, ...) runs for all
sub-blocks at once (independent candidate scales too, as an extra dim), but each sum over a
sub-block's 16/32 values is accumulated element by element in fp32 in C's order (`_seq`), and every
C expression keeps its operation order (no fused multiply-add) and IEEE rounding: `const / tensor`
goes through `_rdiv` and sqrtf through `_sqrtf`, as torch's own are not correctly rounded.
`nearest_int` (add 1.5*2^23) is round-half-to-even, i.e. `torch.round`. Work arrays are "element-major" ([n, M]: element index
first, one column per sub-block); inputs are processed in cache-sized chunks of super-blocks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15
# super-blocks per pass: cache-sized work arrays, yet enough columns per torch call (2-core EPYC)
CHUNK_BLOCKS = {"q2_k": 1024, "q3_k": 4096, "q3_k_im": 256, "q4_k": 1024, "q5_k": 1024, "q6_k": 256}


def _seq(a: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in order (a[0] + a[1] + ...), fp32 like the C loops. a: [n, ...] -> [...].
    numpy's add.reduce over the outer axis of a C-contiguous array adds row by row (pairwise
    summation is only used along the innermost axis): one call, C's sequential order per column."""
    a = a.contiguous()
    return torch.from_numpy(np.add.reduce(a.numpy(), axis=0))


def _chunked(fn, block: int = QK_K, chunks: dict = CHUNK_BLOCKS):
    """Quantize x (and qw) chunks[name] blocks at a time; fn's output rows are blocks."""
    key = fn.__name__.removeprefix("quantize_")

    @functools.wraps(fn)
    def run(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
        x = x.reshape(-1)
        step = chunks.get(key + "_im" if qw is not None else key, chunks[key]) * block
        if x.numel() <= step:
            return fn(x, qw)
        qw = None if qw is None else qw.reshape(-1)
        parts = [
            fn(x[i : i + step], None if qw is None else qw[i : i + step])
            for i in range(0, x.numel(), step)
        ]
        return torch.cat(parts)

    return run


def _nearest(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """nearest_int then clamp to [lo, hi], as float (NaN -> lo, like an out-of-range int would be)."""
    return torch.nan_to_num(torch.round(v), nan=lo).clamp_(lo, hi)


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """C's `c / t` for a constant c, correctly rounded. `python_float / tensor` is NOT: torch
    evaluates it as t.reciprocal() * c (two roundings), about 1 result in 4 off by one ulp."""
    return torch.tensor(c, dtype=torch.float32) / t


def _sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf: correctly rounded. torch.sqrt on CPU float32 is not (it is off by one ulp for
    about 1 input in 5), which moves av_x / the imatrix weights and, through the searches' sums,
    can flip a make_qkx2_quants choice; numpy's float32 sqrt is IEEE-exact."""
    return torch.from_numpy(np.sqrt(v.contiguous().numpy()))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _f(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float32)


def _pos_max(v: torch.Tensor) -> torch.Tensor:
    """C's `m = 0; if (v > m) m = v;` over dim 1: the largest positive value, else +0."""
    m = v.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): the largest |x| over dim 0 and the signed value where it first occurs."""
    a = x.abs()
    idx = a.argmax(0, keepdim=True)  # first maximal index
    return a.gather(0, idx)[0], x.gather(0, idx)[0]


# ---------------------------------------------------------------------------------------------
# the searches of ggml-quants.c, batched over columns


def make_qx_quants(
    x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw). x: [n, M] -> (scale [M], L [n, M] in 0..2nmax-1).
    The first attempt (-nmax / max) and the 18 others (-(nmax + 0.1 i) / max) are independent, so
    all 19 are evaluated at once ([n, 19, M]); the choice then replays C's order."""
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = qw if qw is not None else x * x
    wx = w * x
    steps = torch.tensor([i for i in range(-9, 10) if i], dtype=torch.float32)
    num = torch.cat((torch.tensor([float(-nmax)]), -(nmax + torch.tensor(0.1) * steps)))
    iscale = num[:, None] / mx  # [19, M]
    lv = _nearest(iscale * x[:, None], -nmax, nmax - 1)  # [n, 19, M]
    sums = torch.empty((x.shape[0], 2) + lv.shape[1:])
    torch.mul(wx[:, None], lv, out=sums[:, 0])
    torch.mul(w[:, None], lv, out=sums[:, 1])
    sums[:, 1].mul_(lv)
    del lv
    slx, sl2 = _seq(sums)  # [19, M] each
    scale = torch.where(sl2[0] != 0, slx[0] / sl2[0], torch.zeros_like(slx[0]))
    best = scale * slx[0]
    pick = iscale[0]
    for k in range(1, iscale.shape[0]):
        better = (sl2[k] > 0) & (slx[k] * slx[k] > best * sl2[k])
        pick = torch.where(better, iscale[k], pick)
        scale = torch.where(better, slx[k] / sl2[k], scale)
        best = torch.where(better, scale * slx[k], best)
    L = _nearest(pick * x, -nmax, nmax - 1) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


def _descend(x, w, L, rnd, q3: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5 coordinate-descent passes of make_q3_quants (q3) / make_qp_quants, in element order
    (L [n, M] updated in place) -> (sumlx, suml2). A pass without change is a fixed point, so all
    columns simply run the 5 passes. rnd: C's rounding and clamping of a new level."""
    wx = w * x
    sumlx = _seq(wx * L)
    suml2 = _seq(w * L * L)
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, wxi, li = w[i], x[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = rnd(xi * sl2 / slx)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = (slx > 0) & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            take &= (sl22 > 0) if q3 else (sl2 > 0)
            L[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    return sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): x [n, M] -> (scale [M], L [n, M] in 0..2nmax-1).
    The coordinate descent (`_descend`) visits elements in order."""
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _rdiv(-nmax, mx)
    L = _nearest(iscale * x, -nmax, nmax - 1)
    sumlx, suml2 = _descend(x, x * x, L, lambda v: _nearest(v, -nmax, nmax - 1), q3=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return scale, L


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    v3: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (v3=False) / make_qkx3_quants (v3=True): x, w [n, M] ->
    (scale [M], the_min [M] (>= 0, subtracted), L [n, M] in 0..nmax).
    Each step uses the `min` earlier improvements left, so steps run in order; L is recomputed at
    the end from the winning (iscale, min). Rounding: clamp(round(v)), NaN -> 0, in both versions."""
    sum_w = _seq(w)
    sum_x = _seq(w * x)
    mn = x.amin(0).clamp(max=0.0)
    mx = x.amax(0)
    flat = (mx <= mn) if v3 else (mx == mn)
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    la = torch.empty_like(x)
    e = torch.empty_like(x)
    st = torch.empty((x.shape[0], 3, x.shape[1]))

    def quant(iscale, xmin):  # -> la
        torch.sub(x, xmin, out=la).mul_(iscale).round_().clamp_(0, nmax)
        if not bool(torch.isfinite(iscale).all()):
            la.nan_to_num_(nan=0.0)
        return la

    def err(scale, mins):
        torch.mul(la, scale, out=e).add_(mins).sub_(x)
        if use_mad:
            e.abs_()
        else:
            e.mul_(e)
        return _seq(e.mul_(w))

    iscale = _rdiv(nmax, rng)
    scale = _rdiv(1, iscale)
    quant(iscale, mn)
    best = err(scale, mn)
    pick_is, pick_min = iscale, mn
    cur_min = mn
    for i in range(nstep + 1):
        # C keeps using `min`, which each improvement replaces by the fitted one
        if i:
            rng = torch.where(flat, rng, mx - cur_min)
        iscale = (rmin + torch.tensor(rdelta, dtype=torch.float32) * i + nmax) / rng
        quant(iscale, cur_min)
        torch.mul(w, la, out=st[:, 0])
        torch.mul(st[:, 0], la, out=st[:, 1])
        torch.mul(st[:, 0], x, out=st[:, 2])
        sum_l, sum_l2, sum_xl = _seq(st)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, this_min)
        better = (D > 0) & (cur < best)
        pick_is = torch.where(better, iscale, pick_is)
        pick_min = torch.where(better, cur_min, pick_min)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    L = quant(pick_is, pick_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    cur_min = torch.where(flat, mn, cur_min)
    return scale, -cur_min, L


def make_qp_quants(
    x: torch.Tensor, nmax: int, qw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x >= 0, L, quant_weights): x, qw [n, M] -> (scale [M], L [n, M])."""
    mx = x.amax(0).clamp(min=0.0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _rdiv(nmax, mx)
    L = torch.round(iscale * x)  # no clamp here, as in C
    scale = _rdiv(1, iscale)
    diff = x - scale * L
    best = _seq(qw * diff * diff)
    for i in range(-4, 5):
        if i == 0:
            continue
        iscale_is = (torch.tensor(0.1, dtype=torch.float32) * i + nmax) / mx
        scale_is = _rdiv(1, iscale_is)
        lv = torch.round(iscale_is * x).clamp(max=nmax)
        diff = x - scale_is * lv
        mse = _seq(qw * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    L = torch.round(iscale * x).clamp(max=nmax)
    sumlx, suml2 = _descend(
        x, qw, L, lambda v: torch.nan_to_num(torch.round(v), nan=0.0).clamp(max=nmax), q3=False
    )
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


# ---------------------------------------------------------------------------------------------
# packing helpers


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).bitwise_and_(255).to(torch.uint8)


def _h(h: torch.Tensor) -> torch.Tensor:
    """fp16 [B] -> bytes [B, 2]."""
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """L [B, 256] in 0..3 -> qs [B, 64]: byte (j/4 + l) of each 128-half holds l, l+32, l+64, l+96."""
    q = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales/mins [B, 8] -> the 12 packed bytes of Q4_K/Q5_K (get_scale_min_k4 inverted)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo = torch.cat((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)), 1)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat((lo, hi), 1)  # [B, 12]


def _k3_scales(l6: torch.Tensor) -> torch.Tensor:
    """16 x 6-bit values [B, 16] (0..63) -> the 12 packed bytes of Q3_K."""
    l6 = l6.to(torch.uint8)
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)  # [B, 8]
    h = (l6 >> 4).reshape(-1, 4, 4)  # [B, j/4, j%4]
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)  # [B, 4]
    return torch.cat((low, high), 1)


def _superblocks(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(-1, QK_K)  # [B, 256]


def _em(v: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 256] -> element-major sub-blocks [n, B * 256/n]."""
    return v.reshape(-1, n).t().contiguous()


def _back(v: torch.Tensor, nsub: int) -> torch.Tensor:
    """element-major [n, B * nsub] -> [B, nsub, n]."""
    return v.t().reshape(-1, nsub, v.shape[0])


def _imatrix_weights(xb: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw[l] * sqrtf(sigma2 + x[l]*x[l]) for super-blocks xb [B, 256], qw [B, 256], sigma2 [B]."""
    return qw.float().reshape(xb.shape) * _sqrtf(sigma2[:, None] + xb * xb)


def _sumx2(xb: torch.Tensor) -> torch.Tensor:
    return _seq((xb * xb).t())  # [B], summed in element order


# ---------------------------------------------------------------------------------------------
# Q2_K


@_chunked
def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = _superblocks(x)
    B = xb.shape[0]
    xe = _em(xb, 16)  # [16, B*16]
    if qw is None:
        sc, mn, L = make_qkx_quants(xe, xe.abs(), 3, -0.5, 0.1, 15, True)
        sc, mn = sc.reshape(B, 16), mn.reshape(B, 16)
        max_scale = _pos_max(sc)
        max_min = _pos_max(mn)
        ms = torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))
        mm = torch.where(max_min > 0, max_min, torch.ones_like(max_min))
        ls = _u8(torch.round(_rdiv(15.0, ms)[:, None] * sc)).to(torch.int32)
        lm = _u8(torch.round(_rdiv(15.0, mm)[:, None] * mn)).to(torch.int32)
        ls = torch.where(max_scale[:, None] > 0, ls, torch.zeros_like(ls))
        lm = torch.where(max_min[:, None] > 0, lm, torch.zeros_like(lm))
        scales = _u8(ls | (lm << 4))
        d = _fp16(torch.where(max_scale > 0, max_scale / 15.0, torch.zeros_like(max_scale)))
        dmin = _fp16(torch.where(max_min > 0, max_min / 15.0, torch.zeros_like(max_min)))
    else:
        sigma2 = _sumx2(xb) / QK_K
        we = _em(_imatrix_weights(xb, qw, sigma2), 16)
        sw = _seq(we).reshape(B, 16)
        sc, mn, L = make_qkx_quants(xe, we, 3, -0.9, 0.05, 36, False, v3=True)
        dm, Ls = make_qp_quants(sc.reshape(B, 16).t().contiguous(), 15, sw.t().contiguous())
        mm, Lm = make_qp_quants(mn.reshape(B, 16).t().contiguous(), 15, sw.t().contiguous())
        scales = _u8(Ls.t().to(torch.int32) | (Lm.t().to(torch.int32) << 4))
        d, dmin = _fp16(dm), _fp16(mm)
    L = _back(L, 16)  # [B, 16, 16]
    s32 = scales.to(torch.int32)
    dl = _f(d)[:, None] * (s32 & 0xF).float()  # [B, 16]
    ml = _f(dmin)[:, None] * (s32 >> 4).float()
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    lq = _nearest((xb.reshape(B, 16, 16) + ml[..., None]) / safe[..., None], 0, 3)
    L = torch.where((dl != 0)[..., None], lq, L).reshape(B, QK_K)
    return torch.cat((scales, _pack_2bit(L), _h(d), _h(dmin)), 1)


# ---------------------------------------------------------------------------------------------
# Q3_K


@_chunked
def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = _superblocks(x)
    B = xb.shape[0]
    xe = _em(xb, 16)
    if qw is None:
        sc, L = make_q3_quants(xe, 4)
        sc = sc.reshape(B, 16)
        amax, max_scale = _first_absmax(sc.t())
        nz = max_scale != 0
        iscale = _rdiv(-32.0, torch.where(nz, max_scale, torch.ones_like(max_scale)))
        l6 = _nearest(iscale[:, None] * sc, -32, 31) + 32
        l6 = torch.where(nz[:, None], l6, torch.zeros_like(l6))
        d = _fp16(torch.where(nz, _rdiv(1, iscale), torch.zeros_like(iscale)))
    else:
        sigma2 = 2 * _sumx2(xb) / QK_K
        we = _em(_imatrix_weights(xb, qw, sigma2), 16)
        sw = _seq(we).reshape(B, 16)
        sc, L = make_qx_quants(xe, 4, we)
        d_block, Ls = make_qx_quants(sc.reshape(B, 16).t().contiguous(), 32, sw.t().contiguous())
        l6 = Ls.t()
        d = _fp16(d_block)
    scales = _k3_scales(l6)
    L = _back(L, 16)
    dl = _f(d)[:, None] * (l6 - 32)  # [B, 16]
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    lq = _nearest(xb.reshape(B, 16, 16) / safe[..., None], -4, 3) + 4
    L = torch.where((dl != 0)[..., None], lq, L).reshape(B, QK_K).to(torch.uint8)
    # high bit of element j goes to bit j // 32 of hmask[j % 32]
    hi = (L > 3).to(torch.uint8).reshape(B, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    hmask = (hi << shifts).sum(1, dtype=torch.int32).to(torch.uint8)  # [B, 32]
    L = L & 3
    return torch.cat((hmask, _pack_2bit(L), scales, _h(d)), 1)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K


def _q45_k(xb: torch.Tensor, nmax: int, qw: torch.Tensor | None):
    """Shared Q4_K/Q5_K search: -> (d fp16 [B], dmin fp16 [B], packed scales [B, 12], L [B, 256])."""
    B = xb.shape[0]
    xe = _em(xb, 32)  # [32, B*8]
    if qw is None:
        av_x = _sqrtf(_seq(xe * xe) / 32)
        we = av_x + xe.abs()
        if nmax == 15:
            sc, mn, L = make_qkx_quants(xe, we, 15, -1.0, 0.1, 20, False)
        else:
            sc, mn, L = make_qkx_quants(xe, we, 31, -0.5, 0.1, 15, False)
        sc, mn = sc.reshape(B, 8), mn.reshape(B, 8)
        max_scale = _pos_max(sc)
        max_min = _pos_max(mn)
        inv_s = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
        # uint8_t ls = nearest_int(...); ls = MIN(63, ls): the int wraps to 8 bits first
        ls = _u8(torch.round(inv_s[:, None] * sc)).clamp(max=63)
        lm = _u8(torch.round(inv_m[:, None] * mn)).clamp(max=63)
        d, dmin = _fp16(max_scale / 63.0), _fp16(max_min / 63.0)
    else:
        sigma2 = 2 * _sumx2(xb) / QK_K
        we = _em(_imatrix_weights(xb, qw, sigma2), 32)
        sw = _seq(we).reshape(B, 8).t().contiguous()
        sc, mn, L = make_qkx_quants(xe, we, nmax, -0.9, 0.05, 36, False, v3=True)
        d_block, Ls = make_qp_quants(sc.reshape(B, 8).t().contiguous(), 63, sw)
        m_block, Lm = make_qp_quants(mn.reshape(B, 8).t().contiguous(), 63, sw)
        ls, lm = _u8(Ls.t()).clamp(max=63), _u8(Lm.t()).clamp(max=63)
        d, dmin = _fp16(d_block), _fp16(m_block)
    scales = _k4_scales(ls, lm)
    L = _back(L, 8)  # [B, 8, 32]
    dl = _f(d)[:, None] * ls.float()
    ml = _f(dmin)[:, None] * lm.float()
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    lq = _nearest((xb.reshape(B, 8, 32) + ml[..., None]) / safe[..., None], 0, nmax)
    L = torch.where((dl != 0)[..., None], lq, L).reshape(B, QK_K).to(torch.uint8)
    return d, dmin, scales, L


@_chunked
def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = _superblocks(x)
    d, dmin, scales, L = _q45_k(xb, 15, qw)
    q = L.reshape(-1, 4, 2, 32)  # [B, 64-chunk, half, 32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat((_h(d), _h(dmin), scales, qs), 1)


@_chunked
def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = _superblocks(x)
    d, dmin, scales, L = _q45_k(xb, 31, qw)
    q = L.reshape(-1, 4, 2, 32)  # [B, n/64, half, j]
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hb = (q >> 4).reshape(-1, 8, 32)  # bit (2*(n/64) + half) of qh[j]
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    qh = (hb << shifts).sum(1, dtype=torch.int32).to(torch.uint8)
    return torch.cat((_h(d), _h(dmin), scales, qh, qs), 1)


# ---------------------------------------------------------------------------------------------
# Q6_K


@_chunked
def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    xb = _superblocks(x)
    B = xb.shape[0]
    xe = _em(xb, 16)
    sc, L = make_qx_quants(xe, 32, None if qw is None else _em(qw.float().reshape(-1, QK_K), 16))
    sc = sc.reshape(B, 16)
    amax, max_scale = _first_absmax(sc.t())
    zero = amax < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = _fp16(_rdiv(1, iscale))
    s8 = torch.round(iscale[:, None] * sc).clamp(max=127)  # MIN(127, nearest_int(...)) into int8
    s8 = s8.to(torch.int32).to(torch.int8)
    L = _back(L, 16)
    dl = _f(d)[:, None] * s8.float()
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    lq = _nearest(xb.reshape(B, 16, 16) / safe[..., None], -32, 31) + 32
    L = torch.where((dl != 0)[..., None], lq, L).reshape(B, QK_K).to(torch.uint8)
    q = L.reshape(B, 2, 4, 32)  # [B, half, quarter, l]
    ql = torch.cat(
        (
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ),
        2,
    ).reshape(B, 128)
    h = q >> 4
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(B, 64)
    out = torch.cat((ql, qh, s8.view(torch.uint8), _h(d)), 1)
    # an all-zero super-block is stored as zeros (d = +0)
    return torch.where(zero[:, None], torch.zeros_like(out), out)
