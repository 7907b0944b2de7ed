"""Native weight quantizers (kernels/native/quantize_k.c): Q2_K..Q6_K, IQ4_NL and IQ4_XS, with or
without an importance matrix, and (quantize_legacy.c) Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 without one
(Q8_0 ignores it; the weighted Q4_0..Q5_1 searches stay in torch: `quantize()` returns None),
byte-identical to llmkit.quant's torch reference (quantize.py, kquants.py, iquants.py) and so to
llama.cpp's llama-quantize.

The C code is the torch reference's algorithm written as scalar fp32 code in the same operation
order (no fused multiply-add, correctly rounded division and sqrtf, round-half-to-even), one
super-block at a time, the blocks split over the library's thread pool (`cpu_native.set_threads`);
the bytes never depend on the thread count. `quantize()` returns None when the library (or its
quantizer) is not available, and the caller falls back to torch.
"""

from __future__ import annotations

import ctypes

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.native_lib import load_library

TYPES: frozenset[QT] = frozenset(
    {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS}
    | {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
)
# legacy types whose importance-weighted quantizer has no native version
_UNWEIGHTED_ONLY: frozenset[QT] = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1})

_fn = None
_checked = False


def _quantize_fn():
    global _fn, _checked
    if not _checked:
        _checked = True
        lib, _ = load_library()  # the kernels' library (quant never imports kernels/)
        if lib is not None:
            fn = getattr(lib, "llk_quantize", None)
            if fn is not None:
                i64, vp = ctypes.c_int64, ctypes.c_void_p
                fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int32, vp, i64, i64, vp, vp]
                _fn = fn
    return _fn


def available() -> bool:
    """The native quantizers are built and loaded."""
    return _quantize_fn() is not None


def quantize(
    x: torch.Tensor, qtype: QT, imatrix: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x [..., n] float -> uint8 [..., n / block * type_size], or None if `qtype` has no native
    quantizer here (or none for `imatrix`). imatrix: None or [n] importance weights (one per
    column); Q8_0 ignores it."""
    fn = _quantize_fn()
    if fn is None or qtype not in TYPES or (imatrix is not None and qtype in _UNWEIGHTED_ONLY):
        return None
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = x.shape[-1]
    if n % block:
        raise LlmkitError(f"cannot quantize rows of {n} values to {qtype.name}")
    xf = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    rows = xf.numel() // n if n else 0
    out = torch.empty(*x.shape[:-1], n // block * type_size, dtype=torch.uint8)
    qw = None
    if imatrix is not None:
        qw = imatrix.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        if qw.numel() != n:
            raise LlmkitError(f"imatrix has {qw.numel()} weights for rows of {n} values")
    if rows == 0:
        return out
    if qtype == QT.Q8_0:
        qw = None
    rc = fn(
        int(qtype), xf.data_ptr(), rows, n, None if qw is None else qw.data_ptr(), out.data_ptr()
    )
    if rc != 0:
        raise LlmkitError(f"native quantize {qtype.name} failed ({rc})")
    return out
