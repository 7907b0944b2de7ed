"""The native CPU row ops and attention (kernels/native/rowops.c, attention.c) behind the kernel
table: RMSNorm, RoPE (with the per-head norm and the query scale fused in), GLU, the KV-cache write
and attention over the cache as stored.

Each is one ctypes call on contiguous fp32 rows (a decode step makes a few per layer: dispatching
the equivalent PyTorch ops cost more than computing them). Row results never depend on the other
rows of a call. Bytes per call: the rows read and written (attention: the visible K/V rows of the
cache in their stored type, once per kv head); flops: a few per element (attention:
~2 * T * Hq * S * (Dk + Dv)).
"""

from __future__ import annotations

import ctypes

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native
from llmkit.kernels.native_abi import KVLayer
from llmkit.kernels.rope import ROPE_NEOX

# cache element types the native attention reads: torch dtypes and ggml block types
_KV_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30, QT.Q8_0: 8, QT.Q4_0: 2}
_GLU = cpu_native.GLU_ACTS


def _check(rc: int, what: str) -> None:
    if rc:
        raise LlmkitError(f"native {what} failed (code {rc})")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def rms_norm_cat(parts: tuple, eps: float) -> torch.Tensor:
    """[rms(x_0) * w_0 | rms(x_1) * w_1 | ...] for parts ((x_i [..., n_i], w_i), ...) of the same
    leading shape: each part normed straight into its columns of one [..., sum n_i] output."""
    lead = parts[0][0].shape[:-1]
    xs = [_rows(x).reshape(-1, x.shape[-1]) for x, _ in parts]
    t = xs[0].shape[0]
    widths = [x.shape[-1] for x in xs]
    y = torch.empty(*lead, sum(widths), dtype=torch.float32)
    lib, col = cpu_native.library(), 0
    for x, (_, w), n in zip(xs, parts, widths, strict=True):
        wp = w.data_ptr() if w is not None else None
        rc = lib.llk_rms_norm(x.data_ptr(), t, n, n, wp, eps, y.data_ptr() + 4 * col, y.shape[-1])
        _check(rc, "rms_norm")
        col += n
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = _rows(x)
    n = x.shape[-1]
    y = torch.empty_like(x)
    lib = cpu_native.library()
    wp = w.data_ptr() if w is not None else None
    _check(
        lib.llk_rms_norm(x.data_ptr(), x.numel() // n, n, n, wp, eps, y.data_ptr(), n), "rms_norm"
    )
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int, norm=None,
         scale: float = 1.0, inplace: bool = False) -> torch.Tensor:  # fmt: skip
    """x [T, H, D] (a strided view of wider rows is fine): a rotated copy, the per-head norm
    (weight, eps) applied first and `scale` last when given. `inplace`: x is the caller's scratch
    (e.g. heads of a fresh q/k/v projection): when its heads are fp32 rows of D contiguous
    values, x itself is rotated and returned, whatever its row stride."""
    T, H, D = x.shape
    if inplace and x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == D:
        y, ld = x, x.stride(0)
    else:
        y = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        if y.data_ptr() == x.data_ptr():
            y = y.clone()  # never rotate the caller's tensor in place
        ld = H * D
    cos, sin = _rows(cos), _rows(sin)
    nw, eps = (norm[0].data_ptr(), norm[1]) if norm is not None else (None, 0.0)
    rc = cpu_native.library().llk_rope(
        y.data_ptr(), T, H, D, ld, cos.shape[-1] << 1, int(mode == ROPE_NEOX),
        cos.data_ptr(), sin.data_ptr(), nw, eps, scale,
    )  # fmt: skip
    _check(rc, "rope")
    return y


class RopeSite:
    """`rope(x, ..., inplace=True)` bound to one buffer view x [T, H, D] (fp32 heads of D
    contiguous values, any row stride), its mode, per-head norm and scale: a callable (cos, sin)
    that rotates x in place and returns it."""

    def __init__(self, x: torch.Tensor, mode: int, norm=None, scale: float = 1.0):
        T, H, D = x.shape
        if x.dtype != torch.float32 or x.stride(2) != 1 or x.stride(1) != D:
            raise LlmkitError(f"RoPE in place needs fp32 heads of {D} contiguous values")
        self.x, self._norm = x, norm  # both kept alive: the call reads their pointers
        self._head = (x.data_ptr(), T, H, D, x.stride(0))
        self._tail = (
            norm[0].data_ptr() if norm is not None else None,
            norm[1] if norm is not None else 0.0,
            scale,
        )
        self._neox = int(mode == ROPE_NEOX)

    def __call__(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = _rows(cos), _rows(sin)
        rc = cpu_native.library().llk_rope(
            *self._head, cos.shape[-1] << 1, self._neox, cos.data_ptr(), sin.data_ptr(), *self._tail
        )
        _check(rc, "rope")
        return self.x


def _heads(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[T, H, D] as fp32 rows of H dense heads and the row stride in floats: views of one
    projection (rows strided) are used in place, anything else is copied."""
    T, H, D = x.shape
    if (
        x.dtype == torch.float32
        and x.stride(2) == 1
        and (H == 1 or x.stride(1) == D)
        and (T == 1 or x.stride(0) >= H * D)
    ):
        return x, (x.stride(0) if T > 1 else H * D)
    return x.float().contiguous(), H * D


def mask_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A [T, S] mask as the kernel's bytes (!= 0: visible): a bool mask is viewed, not copied."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.contiguous().view(torch.uint8)
    return mask.to(torch.uint8).contiguous()


def argmax(x: torch.Tensor) -> int:
    x = x.contiguous()
    return int(cpu_native.library().llk_argmax(x.data_ptr(), x.numel()))


def argmax_prob(x: torch.Tensor) -> tuple[int, float]:
    x = x.contiguous()
    prob = ctypes.c_float()
    i = int(cpu_native.library().llk_argmax_prob(x.data_ptr(), x.numel(), ctypes.byref(prob)))
    return i, prob.value


def all_finite(x: torch.Tensor) -> bool:
    x = x.contiguous()
    return bool(cpu_native.library().llk_all_finite(x.data_ptr(), x.numel()))


class EmbedRows:
    """Rows of a GGUF weight (raw: uint8 [n_rows, >= row bytes], rows contiguous) as fp32
    [len(ids), k], times `scale` unless it is 0; an id out of range raises."""

    def __init__(self, raw: torch.Tensor, qtype, k: int, scale: float):
        self.raw, self.k = raw, k  # raw: kept alive while its pointer is bound
        self.bound = (int(qtype), raw.data_ptr(), raw.shape[0], raw.stride(0), k)
        self.scale = scale

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        t = ids.numel()
        y = torch.empty(t, self.k, dtype=torch.float32)
        rc = cpu_native.library().llk_embed_rows(
            *self.bound, ids.data_ptr(), t, self.scale, y.data_ptr()
        )
        if rc:
            if rc == -2:
                raise LlmkitError(
                    f"token ids must lie in [0, {self.raw.shape[0]}) for the embedding lookup"
                )
            _check(rc, "embed_rows")
        return y


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    gu = _rows(gate_up)
    f = gu.shape[-1] // 2
    m = gu.numel() // (2 * f)
    y = torch.empty(*gu.shape[:-1], f, dtype=torch.float32)
    _check(
        cpu_native.library().llk_glu(gu.data_ptr(), m, f, 2 * f, _GLU[act], y.data_ptr(), f), "glu"
    )
    return y


def kv_code(kind) -> int:
    """The native code of a cache element type (a torch dtype or a ggml block type)."""
    code = _KV_CODES.get(kind)
    if code is None:
        raise LlmkitError(f"no native attention for a {kind} KV cache")
    return code


def kv_store(buf: torch.Tensor, kind, slots: torch.Tensor, x: torch.Tensor) -> None:
    """x [T, H, D] fp32 into buf [H, cap, row] at `slots` [T] (converted or quantized)."""
    x = _rows(x)
    T, H, D = x.shape
    es = buf.element_size()
    slots = slots.contiguous()
    rc = cpu_native.library().llk_kv_store(
        x.data_ptr(), T, H, D, H * D, slots.data_ptr(), buf.data_ptr(), kv_code(kind),
        buf.stride(0) * es, buf.stride(1) * es,
    )  # fmt: skip
    _check(rc, "kv_store")


def attention(q, k_buf, k_kind, v_buf, v_kind, dv: int, n_slots: int, kpos, qpos, scale: float,
              window: int | None, mask=None, slot_idx=None) -> torch.Tensor:  # fmt: skip
    """q [T, Hq, Dk] over the first `n_slots` slots of k_buf/v_buf [Hkv, cap, row] (or the
    physical slots `slot_idx` [n_slots], in that order): visible by position (kpos [n_slots],
    qpos [T], window) or by an explicit bool mask [T, n_slots]. Returns [T, Hq * Dv] fp32."""
    q = _rows(q)
    T, hq, dk = q.shape
    hkv = k_buf.shape[0]
    out = torch.empty(T, hq * dv, dtype=torch.float32)
    ks, vs = k_buf.element_size(), v_buf.element_size()
    m = mask_bytes(mask)
    kp = kpos.contiguous() if kpos is not None else None
    qp = qpos.contiguous()
    si = slot_idx.contiguous() if slot_idx is not None else None
    rc = cpu_native.library().llk_attention(
        q.data_ptr(), T, hq, dk, hq * dk,
        k_buf.data_ptr(), kv_code(k_kind), k_buf.stride(0) * ks, k_buf.stride(1) * ks,
        v_buf.data_ptr(), kv_code(v_kind), v_buf.stride(0) * vs, v_buf.stride(1) * vs,
        dv, hkv, n_slots, si.data_ptr() if si is not None else None,
        kp.data_ptr() if kp is not None else None, qp.data_ptr(), window or 0,
        m.data_ptr() if m is not None else None, scale, out.data_ptr(), hq * dv,
    )  # fmt: skip
    _check(rc, "attention")
    return out


class LayerAttention:
    """One cache layer's attention step in one native call: write the batch's k/v rows into
    their slots, then attend (kernels/native/attention.c, llk_attend). The buffers' pointers,
    strides and types are bound once (a decode step makes one call per layer)."""

    def __init__(self, k_buf: torch.Tensor, k_kind, v_buf: torch.Tensor, v_kind, dv: int):
        ks, vs = k_buf.element_size(), v_buf.element_size()
        self.k_buf, self.v_buf, self.dv, self.hkv = k_buf, v_buf, dv, k_buf.shape[0]
        self._static = (
            k_buf.data_ptr(), kv_code(k_kind), k_buf.stride(0) * ks, k_buf.stride(1) * ks,
            v_buf.data_ptr(), kv_code(v_kind), v_buf.stride(0) * vs, v_buf.stride(1) * vs,
            dv, self.hkv,
        )  # fmt: skip
        self._fn = cpu_native.library().llk_attend
        st = self._static  # the same buffers as llk_kv_layer, for a whole-block call
        self.kv = KVLayer(st[0], st[2], st[3], st[4], st[6], st[7], dv, self.hkv, st[1], st[5])
        self.kv_ref = ctypes.byref(self.kv)

    def __call__(self, q, k, v, slots, n_read: int, kpos, qpos, scale: float, window, mask=None):
        """q [T, Hq, Dk], k/v [T, Hkv, D] (fp32, heads contiguous; rows may be strided, e.g.
        views of one projection), slots/kpos/qpos int64 -> [T, Hq * Dv]."""
        (q, ldq), (k, ldk), (v, ldv) = _heads(q), _heads(k), _heads(v)
        T, hq, dk = q.shape
        out = torch.empty(T, hq * self.dv, dtype=torch.float32)
        m = mask_bytes(mask)  # alive during the call
        rc = self._fn(
            q.data_ptr(), T, hq, dk, ldq, k.data_ptr(), ldk, v.data_ptr(), ldv, slots.data_ptr(),
            *self._static,
            n_read, kpos.data_ptr(), qpos.data_ptr(), window or 0,
            m.data_ptr() if m is not None else None, scale, out.data_ptr(),
        )  # fmt: skip
        _check(rc, "attention")
        return out
