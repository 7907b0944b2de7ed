"""Benchmark helper for the native matmul (kernels/cpu_native.py): calls timed in C, back to back,
the way a decode step's one native call makes them (scripts/bench_native_kernels.py)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native as cn
from llmkit.kernels import native_abi


def time_matmuls(linears: Sequence[cn.NativeLinear], x: torch.Tensor, reps: int,
                 lib=None) -> list[float]:  # fmt: skip
    """Seconds of each of `reps` native calls y = x @ W^T timed in C, call r on linears[r % n]
    (same shapes and types: e.g. copies of one matrix that together overflow the caches), so
    that no Python runs between the calls (as in a decode step's one native call). `lib`:
    another build of the library to time (native_abi.load(path)); default the installed one."""
    lib = lib or native_abi.need()
    first = linears[0]
    if any((lin.in_features, lin.out_features, lin.qtypes) != (first.in_features,
           first.out_features, first.qtypes) for lin in linears):  # fmt: skip
        raise LlmkitError("time_matmuls wants linears of one shape and type")
    x = cn._activations(x, first.in_features)
    y = torch.empty(x.shape[0], first.out_features, dtype=torch.float32)
    sets = (native_abi.Part * (first._n_parts * len(linears)))(
        *(p for lin in linears for p in lin._parts)
    )
    ns = (ctypes.c_int64 * reps)()
    rc = lib.llk_matmul_timed(x.data_ptr(), x.shape[0], x.shape[1], sets, first._n_parts,
                              len(linears), y.data_ptr(), y.shape[1], reps, ns)  # fmt: skip
    if rc:
        raise LlmkitError(f"native matmul failed: {native_abi.ERRORS.get(rc, rc)}")
    return [t * 1e-9 for t in ns]
