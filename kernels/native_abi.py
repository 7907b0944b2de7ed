"""The native library's C ABI as Python sees it (kernels/native/llk.h), without torch: the
library loaded with its call signatures bound, the structs its calls take, its error codes, and
the controls every caller shares (instruction-set path, threads). cpu_native.py (matmul on
tensors), cpu_block.py (whole blocks in one call) and cpu_ops.py build on it; it imports neither
torch nor anything that does, so a caller that never needs torch can drive the kernels.

Importing this module never fails: without the library `available()` is False and
`unavailable_reason()` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.native_lib import library_path, load_library

_vp, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float

SUPPORTED_TYPES: frozenset[QT] = frozenset(
    {
        QT.F32, QT.F16, QT.BF16,
        QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.IQ4_NL,
        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS,
    }
)  # fmt: skip
ISAS = ("scalar", "avx2", "avx512_vnni", "neon_dotprod")  # llk.h's LLK_ISA_* order

ERRORS = {-1: "unsupported weight type", -2: "bad shape", -3: "out of memory", -4: "bad ISA"}


class Part(ctypes.Structure):
    """llk.h's llk_part."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("row_stride", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("col", ctypes.c_int64),
        ("type", ctypes.c_int32),
        ("layout", ctypes.c_int32),
    ]


class Fuse(ctypes.Structure):
    """llk.h's llk_fuse: what llk_linear fuses around the matmul."""

    _fields_ = [
        ("norm_w", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float),
        ("glu", ctypes.c_int32),
        ("post_w", ctypes.c_void_p),
        ("post_eps", ctypes.c_float),
        ("reserved", ctypes.c_int32),
        ("residual", ctypes.c_void_p),
        ("ldr", ctypes.c_int64),
    ]


GLU_ACTS = {"silu": 0, "gelu_tanh": 1, "gelu_fp16": 2}  # see kernels/native/rowops.c


def native_glu(act: str) -> str:
    """The activation the native CPU path computes for a model's GLU `act`: tanh-GELU through
    llama.cpp's fp16 table (its CPU GELU), the others as they are."""
    return "gelu_fp16" if act == "gelu_tanh" else act


def load(path=None) -> tuple[ctypes.CDLL | None, str]:
    """The installed library with its call signatures bound, or the one at `path` (another
    build of it: scripts/ab_native.py); (None, why) when it cannot be used."""
    lib, reason = load_library() if path is None else (ctypes.CDLL(str(path)), "")
    if lib is None:
        return None, reason
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
    # fmt: off
    sigs = {
        "llk_matmul": (ctypes.c_int, [vp, i64, i64, i64, vp, i32, vp, i64]),
        "llk_set_threads": (ctypes.c_int, [ctypes.c_int]),
        "llk_get_threads": (ctypes.c_int, []),
        "llk_set_spin_us": (None, [ctypes.c_int]),
        "llk_get_isa": (ctypes.c_int, []),
        "llk_best_isa": (ctypes.c_int, []),
        "llk_isa_supported": (ctypes.c_int, [ctypes.c_int]),
        "llk_set_isa": (ctypes.c_int, [ctypes.c_int]),
        "llk_quantize_q8_1": (ctypes.c_int, [vp, i64, vp, vp, vp, vp]),
        "llk_quantize_q8_K": (ctypes.c_int, [vp, i64, vp, vp, vp]),
        "llk_read_probe": (ctypes.c_uint64, [vp, i64]),
        "llk_pack_x8": (ctypes.c_int, [vp, i64, i64, i64, i32, vp, i32]),
        "llk_x8_native": (ctypes.c_int, [i32]),
        "llk_drop_pages": (None, [vp, i64]),
        "llk_matmul_timed": (ctypes.c_int, [vp, i64, i64, vp, i32, i32, vp, i64, i32, vp]),
        "llk_linear": (ctypes.c_int, [vp, i64, i64, i64, vp, vp, i32, vp, i64]),
        "llk_rms_norm": (ctypes.c_int, [vp, i64, i64, i64, vp, f32, vp, i64]),
        "llk_rope": (ctypes.c_int, [vp, i64, i64, i64, i64, i64, i32, vp, vp, vp, f32, f32]),
        "llk_glu": (ctypes.c_int, [vp, i64, i64, i64, i32, vp, i64]),
        "llk_argmax": (i64, [vp, i64]),
        "llk_argmax_prob": (i64, [vp, i64, ctypes.POINTER(ctypes.c_float)]),
        "llk_all_finite": (ctypes.c_int, [vp, i64]),
        "llk_embed_rows": (ctypes.c_int, [i32, vp, i64, i64, i64, vp, i64, f32, vp]),
        "llk_block_run": (ctypes.c_int, [vp, i64, vp, vp, vp, vp, vp, vp, i64, vp, vp, i64, vp]),
        "llk_stack_run": (ctypes.c_int, [vp, vp, vp, vp, i64, i64, vp, vp, vp, vp, vp, vp]),
        "llk_nextn_run": (ctypes.c_int, [
            vp, i64, vp, vp, vp, i64, vp, vp, vp, vp, vp, vp, i64, vp, vp, i64, vp,
        ]),
        "llk_kv_store": (ctypes.c_int, [vp, i64, i64, i64, i64, vp, vp, i32, i64, i64]),
        "llk_attend": (ctypes.c_int, [
            vp, i64, i64, i64, i64, vp, i64, vp, i64, vp, vp, i32, i64, i64, vp, i32, i64, i64,
            i64, i64, i64, vp, vp, i64, vp, f32, vp,
        ]),
        "llk_attention": (ctypes.c_int, [
            vp, i64, i64, i64, i64, vp, i32, i64, i64, vp, i32, i64, i64, i64, i64, i64, vp, vp,
            vp, i64, vp, f32, vp, i64,
        ]),
    }
    # fmt: on
    try:
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except AttributeError as e:
        return None, f"{path or library_path().name} is stale or foreign ({e}); rebuild it"
    return lib, ""


LIB, REASON = load()


def library() -> ctypes.CDLL:
    """The loaded library (LlmkitError naming the reason when it is not built)."""
    return need()


def available() -> bool:
    """The native library is built and loaded."""
    return LIB is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return REASON


def need() -> ctypes.CDLL:
    if LIB is None:
        raise LlmkitError(f"native CPU kernels unavailable: {REASON}")
    return LIB


def isa() -> str:
    """The instruction-set path in use: 'avx512_vnni', 'avx2', 'neon_dotprod' or 'scalar'."""
    return ISAS[need().llk_get_isa()]


def supported_isas() -> list[str]:
    """The paths this CPU can run, best last."""
    lib = need()
    return [name for i, name in enumerate(ISAS) if lib.llk_isa_supported(i)]


def set_isa(name: str) -> None:
    """Force a path (e.g. 'scalar' in tests); 'best' restores the CPU's best."""
    lib = need()
    i = lib.llk_best_isa() if name == "best" else ISAS.index(name) if name in ISAS else -1
    if i < 0 or lib.llk_set_isa(i) != 0:
        raise LlmkitError(f"ISA {name!r} not available here (supported: {supported_isas()})")


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run a block on another path, then restore the previous one."""
    prev = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(prev)


def set_threads(n: int) -> None:
    """Threads per call, the caller included (n < 1: every CPU of the affinity mask)."""
    need().llk_set_threads(int(n))


def get_threads() -> int:
    return need().llk_get_threads()


def set_spin_us(us: int) -> None:
    """How long idle workers wait for the next call before sleeping (default 100 us)."""
    need().llk_set_spin_us(int(us))


def elems_per_row(qtype: QT, row_bytes: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if row_bytes % size:
        raise LlmkitError(
            f"{qtype.name} rows of {row_bytes} bytes are not whole {size}-byte blocks"
        )
    return row_bytes // size * block


def check_type(qtype) -> QT:
    try:
        qtype = QT(qtype)
    except ValueError:
        raise LlmkitError(f"unknown tensor type {qtype!r}") from None
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise LlmkitError(f"native CPU matmul does not support {qtype.name} weights ({names})")
    return qtype


class KVLayer(ctypes.Structure):
    """llk.h's llk_kv_layer: one cache layer's K/V buffers as llk_attend reads them."""

    _fields_ = [
        ("k", _vp), ("k_head_stride", _i64), ("k_slot_stride", _i64),
        ("v", _vp), ("v_head_stride", _i64), ("v_slot_stride", _i64),
        ("dv", _i64), ("hkv", _i64), ("kt", _i32), ("vt", _i32),
    ]  # fmt: skip


class Block(ctypes.Structure):
    """llk.h's llk_block."""

    _fields_ = [
        ("parts", _vp * 4), ("n_parts", _i32 * 4), ("fuse", Fuse * 4),
        ("n_embd", _i64), ("n_qkv", _i64), ("n_gu", _i64), ("m", _i64),
        ("hq", _i64), ("hkv", _i64), ("dk", _i64), ("dv", _i64), ("n_rot", _i64),
        ("neox", _i32), ("reserved", _i32), ("q_norm", _vp), ("k_norm", _vp),
        ("qk_eps", _f32), ("q_scale", _f32), ("attn_scale", _f32), ("reserved2", _f32),
        ("qkv", _vp), ("o", _vp), ("x1", _vp), ("h", _vp),
    ]  # fmt: skip


class StepGroup(ctypes.Structure):
    """llk.h's llk_step_group: one step's attention inputs for a cache group's layers."""

    _fields_ = [
        ("slots", _vp), ("kpos", _vp), ("qpos", _vp),
        ("n_read", _i64), ("window", _i64), ("mask", _vp),
    ]  # fmt: skip


class NextN(ctypes.Structure):
    """llk.h's llk_nextn."""

    _fields_ = [
        ("embd", _vp), ("embd_rows", _i64), ("embd_row_bytes", _i64),
        ("embd_type", _i32), ("eh_n_parts", _i32), ("embd_scale", _f32), ("eps", _f32),
        ("enorm", _vp), ("hnorm", _vp), ("eh_parts", _vp), ("block", _vp), ("head_parts", _vp),
        ("head_n_parts", _i32), ("reserved", _i32), ("head_fuse", Fuse),
        ("e", _vp), ("cat", _vp), ("x0", _vp), ("zin", _vp),
    ]  # fmt: skip
