"""Quantizer throughput: MB/s of f32 input per ggml type.

    python scripts/bench_quant.py [--rows 1024] [--cols 4096] [--repeat 3] [--types Q4_K,Q6_K]
                                  [--model PATH.gguf] [--imatrix]

Reports the best (minimum-time) of `--repeat` runs on a fixed random N(0, 1) tensor and, with
`--model`, on every 2-D weight of that GGUF model dequantized to f32 (one pass, summed time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.quant.quantize import quantize

DEFAULT_TYPES = "Q4_0,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_random(types, rows, cols, repeat, imatrix):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32))
    imat = torch.from_numpy(np.random.default_rng(1).random(cols).astype(np.float32) + 0.1)
    mb = x.numel() * 4 / 1e6
    print(
        f"random {rows}x{cols} f32 ({mb:.1f} MB), best of {repeat}"
        + (", imatrix" if imatrix else "")
    )
    for name in types:
        qt = QT[name]
        best = min(
            _time(lambda qt=qt: quantize(x, qt, imat if imatrix else None)) for _ in range(repeat)
        )
        print(f"  {name:7s} {mb / best:9.2f} MB/s  ({best:.3f} s)", flush=True)


def bench_model(types, path):
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.quant.dequant import dequantize

    g = GGUFFile(path)
    ws = []
    for name, t in g.tensors.items():
        if len(t.shape) == 2 and t.shape[-1] % 256 == 0:
            ws.append(dequantize(g.torch_raw(name), t.qtype, t.shape).float())
    mb = sum(w.numel() for w in ws) * 4 / 1e6
    print(f"model {path}: {len(ws)} 2-D tensors, {mb:.1f} MB f32")
    for name in types:
        qt = QT[name]
        dt = sum(_time(lambda w=w, qt=qt: quantize(w, qt)) for w in ws)
        print(f"  {name:7s} {mb / dt:9.2f} MB/s  ({dt:.3f} s)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--model", default=None)
    ap.add_argument("--imatrix", action="store_true", help="also pass a random importance matrix")
    a = ap.parse_args()
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    bench_random(types, a.rows, a.cols, a.repeat, a.imatrix)
    if a.model:
        bench_model(types, a.model)


if __name__ == "__main__":
    main()
