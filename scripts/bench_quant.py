"""Quantizer throughput: MB/s of f32 input per ggml type, native (C) vs torch reference.

    python scripts/bench_quant.py [--rows 1024] [--cols 4096] [--repeat 3] [--types Q4_K,Q6_K]
                                  [--model PATH.gguf] [--imatrix] [--threads N] [--no-torch]

Reports the best (minimum-time) and median of `--repeat` runs on a fixed random N(0, 1) tensor
for the native quantizers (quant/native.py; '-' for a type without one) and the torch
reference (quantize(..., native=False)), and, with `--model`, on every 2-D weight of that GGUF
model dequantized to f32 (one pass, summed time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.kernels import cpu_native
from llmkit.quant import native as quant_native
from llmkit.quant.quantize import quantize

DEFAULT_TYPES = "Q4_0,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rate(mb: float, ts: list[float]) -> str:
    ts = sorted(ts)
    return f"{mb / ts[0]:8.1f} {mb / ts[len(ts) // 2]:8.1f}"


def bench_random(types, rows, cols, repeat, imatrix, with_torch):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32))
    imat = torch.from_numpy(np.random.default_rng(1).random(cols).astype(np.float32) + 0.1)
    im = imat if imatrix else None
    mb = x.numel() * 4 / 1e6
    print(
        f"random {rows}x{cols} f32 ({mb:.1f} MB), {repeat} runs"
        + (", imatrix" if imatrix else "")
        + "; MB/s best / median"
    )
    print(f"  {'type':7s} {'native':>17s} {'torch':>17s}  speedup (best)")
    for name in types:
        qt = QT[name]
        nat = tor = None
        if qt in quant_native.TYPES and quant_native.available():
            nat = [_time(lambda qt=qt: quantize(x, qt, im)) for _ in range(repeat)]
        if with_torch or nat is None:
            tor = [_time(lambda qt=qt: quantize(x, qt, im, native=False)) for _ in range(repeat)]
        line = f"  {name:7s} {_rate(mb, nat) if nat else '-':>17s} {_rate(mb, tor) if tor else '-':>17s}"
        if nat and tor:
            line += f"  {min(tor) / min(nat):6.1f}x"
        print(line, flush=True)


def bench_model(types, path, with_torch):
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.quant.dequant import dequantize

    g = GGUFFile(path)
    ws = []
    for name, t in g.tensors.items():
        if len(t.shape) == 2 and t.shape[-1] % 256 == 0:
            ws.append(dequantize(torch.from_numpy(g.raw(name)), t.qtype, t.shape).float())
    mb = sum(w.numel() for w in ws) * 4 / 1e6
    print(f"model {path}: {len(ws)} 2-D tensors, {mb:.1f} MB f32; MB/s native, torch")
    for name in types:
        qt = QT[name]
        line = f"  {name:7s}"
        for native in (True, False) if with_torch else (True,):
            dt = sum(_time(lambda w=w, qt=qt, n=native: quantize(w, qt, native=n)) for w in ws)
            line += f" {mb / dt:9.2f} ({dt:.3f} s)"
        print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--model", default=None)
    ap.add_argument("--imatrix", action="store_true", help="also pass a random importance matrix")
    ap.add_argument("--threads", type=int, default=0, help="threads (0: all CPUs)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
        if cpu_native.available():
            cpu_native.set_threads(a.threads)
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    bench_random(types, a.rows, a.cols, a.repeat, a.imatrix, not a.no_torch)
    if a.model:
        bench_model(types, a.model, not a.no_torch)


if __name__ == "__main__":
    main()
