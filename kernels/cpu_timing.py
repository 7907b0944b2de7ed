"""Benchmark helper for the native matmul (kernels/cpu_native.py): calls timed in C, back to back,
the way a decode step's one native call makes them (scripts/bench_native_kernels.py), and paired
rounds of such timings (scripts/ab_native.py: two builds; scripts/bench_x8.py: two layouts)."""

from __future__ import annotations

import ctypes
import statistics
from collections.abc import Sequence

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native as cn
from llmkit.kernels import native_abi

FFN_SHAPES = [(640, 2048), (576, 1536)]  # (N, K): Gemma 3's and SmolLM2's FFN down projections


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


def warm_times(lin: cn.NativeLinear, x: torch.Tensor, reps: int, lib=None) -> list[float]:
    """`reps` back-to-back calls timed in C (`lib` as in time_matmuls), the first tenth dropped
    (they warm the caches)."""
    return time_matmuls([lin], x, reps, lib)[reps // 10 :]


def paired(calls, rounds: int) -> list[float]:
    """Per call (each returns a round's per-repetition seconds, e.g. warm_times bound to one
    build or one layout): the smallest of `rounds` round medians in microseconds, the calls
    taking turns in every round, so that a machine's drift hits them alike."""
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            best[i] = min(best[i], statistics.median(call()) * 1e6)
    return best
