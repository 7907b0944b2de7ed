"""Native CPU matmul on GGUF weight blocks: y = x @ W^T straight from the file's bytes.

What it computes: Y[M, N] = X[M, K] @ W[N, K]^T for W in any of SUPPORTED_TYPES, read in place
(the mmap'd GGUF bytes, never a dequantized copy). As in llama.cpp, each activation row is first
rounded to the weight type's activation format: q8_0 blocks of 32 (Q4_0, Q5_0, Q8_0, IQ4_NL),
q8_1 (Q4_1, Q5_1: q8_0 plus s = d * sum(q) in fp16, for the min term), q8_K blocks of 256 with
fp32 d and 16-value sums (K-quants, IQ4_XS), fp16 (F16), bf16 (BF16) or fp32 (F32). Every block
dot product is exact in int32; the fp32 accumulation across blocks is the only rounding, so the
result equals llama.cpp's to fp32 summation order.

Cost per call: bytes = weight bytes + M*K*4 + M*N*4, flops = 2*M*N*K. M = 1 (decode) streams
each weight byte once, prefetching ahead into L2. On x86 the vector lanes are 8 weight rows:
the 32-value types and Q4_K-Q6_K are stored so at load (x8 groups, kernels/cpu_pack.py: the same
bytes moved; from GGUF rows, `pack=False`, they are transposed on the fly), an activation row
costing a few int8 dot instructions per block for 8 outputs; Q2_K Q3_K IQ4_XS and floats go row
by row. M = 2..16 (MTP verify) decodes each weight block once per
tile of up to 16 activation rows (AVX-512; 4 on AVX2, 8 for K-quants and float types); larger M
walks ~16 KB of weight rows at a time past every tile.

Batch invariance: output (m, n) is bit-identical whatever M is, whatever the thread count or
layout, and whichever rows share the call: each output element is computed by one kernel call
whose sequence of fp32 operations does not depend on the tile, group or thread it lands in;
threads split N, never K. Paths may differ in the last bits (AVX2 and AVX-512 agree exactly).

ISA: chosen at load time from the CPU's features (x86-64: AVX-512 F/BW/VL + VNNI, else AVX2 + FMA
+ F16C, else portable C; aarch64: NEON dotprod from HWCAP, else portable C); the library itself
is built without -march flags and selects per function. `use_isa("scalar")` forces a path (tests).
The aarch64 path has run only under qemu-user (kernels/native/selftest.c), not on arm64 hardware.

Threads: a persistent pool in C, the caller included (`set_threads`, default: the CPUs of the
process's affinity mask). Each call is cut into a few chunks of N claimed by whichever thread is
free, so a worker descheduled by a busy machine (or by torch's own threads spinning between ops)
delays nothing it has not claimed. Idle workers spin ~100 us (`set_spin_us`) for the next call,
then sleep.

The library is `llmkit/kernels/_llk*.so`, built by setup.py (a plain shared library loaded with
ctypes, which releases the GIL during the call). Without it `available()` is False and
`unavailable_reason()` says why; importing this module never fails.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from threading import get_ident

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import native_abi as abi
from llmkit.kernels import native_bind
from llmkit.kernels.native_abi import (  # the library and its controls, as this module's API
    GLU_ACTS,
    ISAS,
    SUPPORTED_TYPES,
    available,
    get_threads,
    isa,
    library,
    set_isa,
    set_spin_us,
    set_threads,
    supported_isas,
    unavailable_reason,
    use_isa,
)

__all__ = [
    "GLU_ACTS", "ISAS", "SUPPORTED_TYPES", "NativeLinear", "available", "get_threads", "isa",
    "library", "matmul", "set_isa", "set_spin_us", "set_threads", "supported_isas",
    "unavailable_reason", "use_isa",
]  # fmt: skip

_MATMUL = abi.LIB.llk_matmul if abi.LIB is not None else None
_LINEAR = abi.LIB.llk_linear if abi.LIB is not None else None


def _weight_bytes(w: torch.Tensor, qtype: QT, k: int | None, name: str) -> np.ndarray:
    """w's memory as uint8 [N, row_bytes] whose rows hold k elements each (checked)."""
    if w.device.type != "cpu":
        raise LlmkitError(f"{name}: native CPU matmul needs CPU weights, got {w.device}")
    if w.dtype != torch.uint8:
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
            raise LlmkitError(f"{name}: weight bytes must be uint8, got {w.dtype}")
        w = w.view(torch.uint8)
    if w.dim() != 2 or w.stride(1) != 1:
        raise LlmkitError(
            f"{name}: weight bytes must be [N, row_bytes] with contiguous rows, "
            f"got shape {tuple(w.shape)} strides {w.stride()}"
        )
    return native_bind.weight_rows(w.numpy(), qtype, k, name)


def _activations(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.device.type != "cpu":
        raise LlmkitError(f"native CPU matmul needs CPU activations, got {x.device}")
    if x.shape[-1] != k:
        raise LlmkitError(f"activations of shape {tuple(x.shape)} do not have K={k} columns")
    x = x.reshape(-1, k)
    if x.dtype != torch.float32 or x.stride(1) != 1:
        x = x.to(torch.float32).contiguous()
    return x


def _call(x: torch.Tensor, parts, n_parts: int, out: torch.Tensor) -> None:
    rc = abi.need().llk_matmul(
        x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), parts, n_parts,
        out.data_ptr(), out.stride(0),
    )  # fmt: skip
    if rc:
        raise LlmkitError(f"native matmul failed: {abi.ERRORS.get(rc, rc)}")


def _output(out: torch.Tensor | None, m: int, n: int) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=torch.float32)
    if (
        out.dtype != torch.float32
        or out.device.type != "cpu"
        or out.dim() != 2
        or tuple(out.shape) != (m, n)
        or out.stride(1) != 1
    ):
        raise LlmkitError(f"out must be fp32 CPU [{m}, {n}] with contiguous rows")
    return out


def matmul(
    x: torch.Tensor, w: torch.Tensor, qtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x fp32 [M, K] @ W^T -> fp32 [M, N], W the GGUF bytes uint8 [N, row_bytes] of `qtype`
    (rows may be a slice of a bigger buffer). `out`, if given, is written and returned."""
    qtype = abi.check_type(qtype)
    if x.dim() != 2:
        raise LlmkitError(f"matmul wants x of shape [M, K], got {tuple(x.shape)}")
    w = _weight_bytes(w, qtype, x.shape[1], "matmul")
    x = _activations(x, x.shape[1])
    y = _output(out, x.shape[0], w.shape[0])
    part = abi.Part(w.ctypes.data, w.strides[0], w.shape[0], 0, int(qtype), 0)
    _call(x, ctypes.byref(part), 1, y)
    return y


class NativeLinear:
    """One linear layer over one or several GGUF weights fused along N (q/k/v, gate/up).

    parts: (bytes uint8 [N_i, row_bytes], qtype, (N_i, K)) each; the types may differ. A call
    writes every part's columns into its slice of one [..., sum N_i] output in one native call.
    The weight views are kept (no copies): they must stay valid, e.g. the GGUF mmap.
    x: [..., K] (converted to contiguous fp32 if it is not). Returns fp32 [..., sum N_i], or
    writes and returns `out` (fp32 [M, sum N_i] with contiguous rows) when given.
    """

    def __init__(self, parts: Sequence[tuple[torch.Tensor, object, tuple[int, int]]],
                 release: bool = False, pack: bool = True):  # fmt: skip
        """`pack`: store the parts the ISA path reads in x8 groups that way (kernels/cpu_pack.py);
        `release`: they view a read-only file mapping (the GGUF's) whose pages may be dropped
        once packed. The binding itself is native_bind.BoundLinear's."""
        abi.need()
        if not parts:
            raise LlmkitError("NativeLinear needs at least one weight")
        rows = []
        for i, (w, qtype, shape) in enumerate(parts):
            qt = abi.check_type(qtype)
            rows.append((_weight_bytes(w, qt, None, f"part {i} ({qt.name} {tuple(shape)})"), qt,
                         shape))  # fmt: skip
        self.bound = bl = native_bind.BoundLinear(rows, release, pack)
        self.in_features, self.out_features, self.qtypes = (
            bl.in_features,
            bl.out_features,
            bl.qtypes,
        )
        self._parts, self._n_parts, self.weight_bytes = bl.parts, bl.n_parts, bl.weight_bytes
        # (source rows, x8 groups) as tensors over the same memory (pin_weights, the plan)
        self.packed = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in bl.packed]
        self._fuses: dict = {}  # see fused()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        # fast path (decode: hundreds of calls per token): contiguous fp32 [M, K], fresh output
        if (
            out is None
            and x.dtype == torch.float32
            and x.dim() == 2
            and x.shape[1] == k
            and x.is_cpu
            and x.is_contiguous()
        ):
            m = x.shape[0]
            y = torch.empty(m, n, dtype=torch.float32)  # whatever torch's default dtype
            rc = _MATMUL(x.data_ptr(), m, k, k, self._parts, self._n_parts, y.data_ptr(), n)
            if rc:
                raise LlmkitError(f"native matmul failed: {abi.ERRORS.get(rc, rc)}")
            return y
        lead = x.shape[:-1]
        x2 = _activations(x, self.in_features)
        y = _output(out, x2.shape[0], self.out_features)
        _call(x2, self._parts, self._n_parts, y)
        return y.view(*lead, self.out_features) if out is None else y

    def fused(self, x: torch.Tensor, norm=None, glu: str | None = None, post_norm=None,
              residual: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One native call: y = residual + post_norm(glu(norm(x)) @ W^T); `norm` and
        `post_norm` are (weight fp32 [n], eps), `glu` "silu" or "gelu_tanh" over an [M, 2K]
        input. x: contiguous fp32 [M, K] (or [M, 2K]); residual: contiguous fp32 [M, N];
        `out`, if given (contiguous fp32 [M, N]), is written and returned."""
        m, k_in, n = x.shape[0], x.shape[1], self.out_features
        if k_in != (self.in_features << 1 if glu else self.in_features):
            raise LlmkitError(f"{self!r}: input of {k_in} columns" + (" (GLU)" if glu else ""))
        # the llk_fuse struct of a call site (its norms, GLU; per thread: the residual pointer is
        # set per call) is built once: a decode step makes a hundred of these calls
        key = (
            None if norm is None else id(norm[0]), None if norm is None else norm[1], glu,
            None if post_norm is None else id(post_norm[0]),
            None if post_norm is None else post_norm[1], get_ident(),
        )  # fmt: skip
        fb = self._fuses.get(key)
        if fb is None:
            fb = self._fuses[key] = self._fuse(norm, glu, post_norm)
        f, ref = fb[0], fb[1]
        f.residual = residual.data_ptr() if residual is not None else None
        if out is None:
            y = torch.empty(m, n, dtype=torch.float32)
        elif out.dtype == torch.float32 and out.shape == (m, n) and out.is_contiguous():
            y = out
        else:
            raise LlmkitError(f"out must be contiguous fp32 [{m}, {n}]")
        rc = _LINEAR(x.data_ptr(), m, k_in, k_in, ref, self._parts, self._n_parts, y.data_ptr(), n)
        if rc:
            raise LlmkitError(f"native linear failed: {abi.ERRORS.get(rc, rc)}")
        return y

    def site(self, norm=None, glu: str | None = None, post_norm=None) -> _Site:
        """`fused` bound to one call site's norms and GLU: a callable (x, residual=None,
        out=None) with its llk_fuse built once. Not thread-safe (a call sets its residual
        pointer): one per thread, e.g. in per-thread step buffers."""
        return _Site(self, self._fuse(norm, glu, post_norm))

    def _fuse(self, norm, glu, post_norm) -> tuple:
        """(llk_fuse, its byref, the norm weights it points into: kept alive with it)."""
        f = self.bound.fuse(
            (norm[0].data_ptr(), norm[1]) if norm is not None else None,
            glu,
            (post_norm[0].data_ptr(), post_norm[1]) if post_norm is not None else None,
        )
        return f, ctypes.byref(f), norm, post_norm

    def __repr__(self) -> str:
        types = "+".join(t.name for t in self.qtypes)
        return f"NativeLinear({types}, {self.in_features} -> {self.out_features})"


class _Site:
    """NativeLinear.site(): one native call, y = residual + post_norm(glu(norm(x)) @ W^T)."""

    def __init__(self, lin: NativeLinear, fuse: tuple):
        self.lin, self._fuse = lin, fuse  # fuse keeps the norm weights alive
        self._f, self._ref = fuse[0], fuse[1]
        self._k = lin.in_features * (2 if fuse[0].glu >= 0 else 1)
        self._n, self._parts, self._n_parts = lin.out_features, lin._parts, lin._n_parts

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x contiguous fp32 [M, K] (checked); residual / out contiguous fp32 [M, N] (the
        caller's to guarantee: e.g. its own buffers and outputs)."""
        k, n = self._k, self._n
        m = x.shape[0]
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous():
            raise LlmkitError(f"{self.lin!r}: input must be contiguous fp32 [M, {k}]")
        self._f.residual = residual.data_ptr() if residual is not None else None
        y = torch.empty(m, n, dtype=torch.float32) if out is None else out
        rc = _LINEAR(x.data_ptr(), m, k, k, self._ref, self._parts, self._n_parts, y.data_ptr(), n)
        if rc:
            raise LlmkitError(f"native linear failed: {abi.ERRORS.get(rc, rc)}")
        return y


def _quantize_rows(x: torch.Tensor, kind: str):
    """Test hook: the current path's activation quantizer on one fp32 row [K].
    'q8_1' -> (qs int8 [K], d fp32 [K/32], s fp32 [K/32], isum int32 [K/32]); 'q8_K' -> (qs,
    d [K/256], bsums int16 [K/16])."""
    lib = abi.need()
    x = x.to(torch.float32).contiguous().view(-1)
    k = x.numel()
    qs = torch.empty(k, dtype=torch.int8)
    if kind == "q8_1":
        d, s, i = (
            torch.empty(k // 32, dtype=torch.float32),
            torch.empty(k // 32, dtype=torch.float32),
            torch.empty(k // 32, dtype=torch.int32),
        )
        rc = lib.llk_quantize_q8_1(
            x.data_ptr(), k, qs.data_ptr(), d.data_ptr(), s.data_ptr(), i.data_ptr()
        )
        if rc == 0:
            return qs, d, s, i
    else:
        d = torch.empty(k // 256, dtype=torch.float32)
        s = torch.empty(k // 16, dtype=torch.int16)
        rc = lib.llk_quantize_q8_K(x.data_ptr(), k, qs.data_ptr(), d.data_ptr(), s.data_ptr())
    if rc:
        raise LlmkitError(f"cannot quantize a row of {k} values to {kind}")
    return qs, d, s
