"""Paired A/B of the native kernels: a git revision's library against the working tree's.

    python scripts/ab_native.py REV [--types Q4_K,Q5_K] [-m 1,2,4,8] [--attention] [-r 40]
                                [--isa avx2]

Builds the library of revision REV (`git archive` of setup.py and kernels/native, compiled by
that revision's own setup.py) into a temporary directory and loads it beside the installed build
of the working tree (`pip install -e .` first), in one process. Each cell then alternates the
two libraries for -r rounds on the same inputs, one thread, the weights or the cache resident
in the caches (compute, not DRAM), and prints the smaller of the rounds' medians per library and
their ratio B / A (A = REV, B = working tree). On a noisy VM this resolves differences of a few
percent that separate processes minutes apart cannot.

Matmul cells: a random [N, K] matrix of each type quantized once and packed as the working tree
packs it (kernels/cpu_pack.py: both builds must read that layout), on the models' shapes.
--attention: decode attention (llk_attention) of M query rows over a cache of S slots of each
--kv type (f16, q8_0, q4_0: K and V), with SmolLM2-135M's heads (9 q, 3 kv, dim 64) and Gemma 3
270M's (4 q, 1 kv, dim 256).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.kernels import cpu_native as cn
from llmkit.kernels import cpu_timing, native_abi
from llmkit.native_lib import library_path
from llmkit.quant.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]
HEADS = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}  # q heads, kv heads, head dim


def build(rev: str, out: Path) -> Path:
    """The library of `rev`, built by its own setup.py in `out`."""
    src = out / "src"
    src.mkdir()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "setup.py", "kernels/native"],
                         capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(out / "lib")],
                   cwd=src, check=True, capture_output=True)  # fmt: skip
    return next((out / "lib").rglob("_llk*.so"))


def time_attention(lib, heads: tuple, kv_type: int, q, k, v, kpos, qpos, out, reps: int):
    """`reps` calls of `lib`'s llk_attention (seconds each, the first tenth dropped); k, v: one
    layer's buffers [hkv, S, row bytes or values] of cache type `kv_type` (ggml's type id)."""
    hq, hkv, d = heads
    m, s = q.shape[0], k.shape[1]
    hs, ss = k.stride(0) * k.element_size(), k.stride(1) * k.element_size()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        rc = lib.llk_attention(
            q.data_ptr(), m, hq, d, hq * d, k.data_ptr(), kv_type, hs, ss, v.data_ptr(), kv_type,
            hs, ss, d, hkv, s, None, kpos.data_ptr(), qpos.data_ptr(), 0, None, d**-0.5,
            out.data_ptr(), hq * d,
        )  # fmt: skip
        times.append((time.perf_counter_ns() - start) * 1e-9)
        if rc:
            raise SystemExit(f"llk_attention failed ({rc})")
    return times[reps // 10 :]


def matmul_cells(libs, types, ms, rounds: int) -> None:
    for t in types:
        for n, k in cpu_timing.FFN_SHAPES:
            raw = quantize(torch.randn(n, k) * 0.02, QT[t])
            lin = cn.NativeLinear([(raw, QT[t], (n, k))])
            for m in ms:
                x = torch.randn(m, k)
                calls = [functools.partial(cpu_timing.warm_times, lin, x, 60, lib) for lib in libs]
                a, b = cpu_timing.paired(calls, rounds)
                print(f"{t:5} {n}x{k:<5} M={m:<2}  A {a:7.1f} us  B {b:7.1f} us  B/A {b / a:.3f}")


def cache_buffer(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x [hkv, S, d] as a cache buffer of type `kind`: f16 values or ggml blocks per row."""
    if kind == "f16":
        return x.half()
    raw = quantize(x.reshape(-1, x.shape[-1]), QT[kind.upper()])
    return raw.view(x.shape[0], x.shape[1], -1)


def attention_cells(libs, ms, slots, kinds, rounds: int) -> None:
    for kind in kinds:
        code = int(QT.F16 if kind == "f16" else QT[kind.upper()])
        for name, (hq, hkv, d) in HEADS.items():
            for s in slots:
                g = torch.Generator().manual_seed(0)
                k = cache_buffer(torch.randn(hkv, s, d, generator=g), kind)
                v = cache_buffer(torch.randn(hkv, s, d, generator=g), kind)
                for m in ms:
                    q = torch.randn(m, hq * d, generator=g)
                    args = (q, k, v, torch.arange(s), torch.arange(s - m, s),
                            torch.empty(m, hq * d))  # fmt: skip
                    calls = [functools.partial(time_attention, lib, (hq, hkv, d), code, *args, 30)
                             for lib in libs]  # fmt: skip
                    a, b = cpu_timing.paired(calls, rounds)
                    print(f"attention {kind:4} {name:8} S={s:<5} M={m}  A {a:7.1f} us  "
                          f"B {b:7.1f} us  B/A {b / a:.3f}")  # fmt: skip


def load(path: Path) -> ctypes.CDLL:
    """A build of the library with its call signatures bound (native_abi.load), on one thread."""
    lib, reason = native_abi.load(path)
    if lib is None:
        raise SystemExit(reason)
    lib.llk_set_threads(1)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the baseline revision (A), e.g. HEAD~1")
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0,Q4_1")
    ap.add_argument("-m", default="1,2,4,8", help="activation rows (attention: query rows)")
    ap.add_argument("--attention", action="store_true", help="decode attention cells instead")
    ap.add_argument("--slots", default="256,1024", help="cache slots of the attention cells")
    ap.add_argument("--kv", default="f16", help="cache types of the attention cells (f16,q8_0)")
    ap.add_argument("-r", "--rounds", type=int, default=40)
    ap.add_argument("--isa", default="best", help="the path both libraries run (e.g. avx2)")
    a = ap.parse_args()
    ms = [int(v) for v in a.m.split(",")]
    cn.set_threads(1)
    cn.set_isa(a.isa)  # the packing of the matmul cells follows the path
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        libs = [load(build(a.rev, Path(tmp))), load(library_path())]
        for lib in libs:
            lib.llk_set_isa(cn.ISAS.index(cn.isa()))
        print(f"A = {a.rev}, B = the working tree's build; {cn.isa()}, one thread, resident")
        if a.attention:
            slots = [int(v) for v in a.slots.split(",")]
            attention_cells(libs, ms, slots, a.kv.split(","), a.rounds)
        else:
            matmul_cells(libs, a.types.split(","), ms, a.rounds)


if __name__ == "__main__":
    main()
