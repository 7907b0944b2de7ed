"""Sweep the Triton GEMV launch configuration per quant type and regime on a GPU.

    python scripts/tune_triton_gemv.py [--n 4096] [--k 4096] [--types Q4_K,Q8_0,...] [--json F]

For each type and regime (M = 1 decode; M = 4 for the 2..16-row MTP-verify regime) it times
block_n x blocks-per-step x split-K target (programs per SM) at 4 warps, then 2 and 8 warps for the
best of those, each as a CUDA graph over weight copies that exceed L2 (scripts/bench_triton.py's
method). It prints GB/s per configuration and, last, the best rows in the form of
kernels/triton_gemv.py's _GPU_CONFIG table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import _copies, _graph_ms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--types", default="Q4_K,Q8_0,Q6_K,Q5_0,Q4_1")
    ap.add_argument("--json", type=Path, default=None, help="every run's figures")
    ap.add_argument(
        "--write-config",
        type=Path,
        default=None,
        help="best rows as JSON for $LLMKIT_TRITON_GEMV_CONFIG (kernels/triton_gemv.py)",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton_gemv: needs a CUDA device")
        return 1
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT

    from llmkit.kernels.triton_gemv import qgemv
    from llmkit.quant.quantize import quantize

    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / _graph_ms([lambda s=src, d=dst: d.copy_(s)]) / 1e6
    del src, dst
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s; N={args.n} K={args.k}")
    w_f = torch.randn(args.n, args.k) * 0.02
    results, best = [], {}
    for name in args.types.split(","):
        qt = QT[name]
        bs = GGML_QUANT_SIZES[qt][0]
        w0 = quantize(w_f, qt).to(dev)
        nb = w0.numel()
        ws = [w0.clone() for _ in range(_copies(nb, l2))]
        gs = (2, 4, 8) if bs == 32 else (1, 2)
        for regime, M in (("gemv", 1), ("small", 4)):
            x = torch.randn(M, args.k, device=dev, dtype=torch.bfloat16)
            dots = (False,) if M == 1 else (True, False)

            def run(
                bn,
                g,
                warps,
                dot,
                pps,
                x=x,
                qt=qt,
                nb=nb,
                M=M,
                regime=regime,
                name=name,
                ws=ws,
                bs=bs,
            ):
                if not dot and M > 1 and bn * g * bs * 4 > 16384:
                    return None  # broadcast tile too big for registers
                kw = dict(block_n=bn, blocks_per_step=g, num_warps=warps, use_dot=dot)
                kw["programs_per_sm"] = pps
                try:
                    ms = _graph_ms([lambda w=w: qgemv(x, w, qt, **kw) for w in ws], reps=10)
                except Exception as e:  # a configuration the compiler rejects: skip it
                    print(f"  {name} {regime} {kw}: {type(e).__name__}")
                    return None
                gbs = (nb + x.numel() * 2 + M * args.n * 4) / ms / 1e6
                results.append(dict(type=name, regime=regime, gbs=gbs, us=ms * 1e3, **kw))
                return gbs

            cands = []
            for dot in dots:
                for bn in (16, 32, 64) if dot else (4, 8, 16, 32):
                    for g in gs:
                        for pps in (2, 4, 8, 16):
                            gbs = run(bn, g, 4, dot, pps)
                            if gbs:
                                cands.append((gbs, bn, g, 4, dot, pps))
            cands.sort(reverse=True)
            top = cands[0]
            for warps in (1, 2, 8):
                gbs = run(top[1], top[2], warps, top[4], top[5])
                if gbs and gbs > top[0]:
                    top = (gbs, top[1], top[2], warps, top[4], top[5])
            best[(name, regime)] = top
            print(
                f"{name:6s} {regime:5s}: {top[0]:6.0f} GB/s ({100 * top[0] / copy:.0f}% of copy) "
                f"block_n={top[1]} G={top[2]} warps={top[3]} dot={top[4]} pps={top[5]}"
            )
        del ws
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"copy_gbs": copy, "runs": results}, indent=1))
    if args.write_config:
        rows = {
            f"{n}:{r}": [bn, g, w, dot, pps] for (n, r), (_, bn, g, w, dot, pps) in best.items()
        }
        args.write_config.write_text(json.dumps(rows, indent=1))
    print("\n_GPU_CONFIG rows:")
    for (name, regime), (gbs, bn, g, warps, dot, pps) in best.items():
        print(f'    ("{name}", "{regime}"): ({bn}, {g}, {warps}, {dot}, {pps}),  # {gbs:.0f} GB/s')
    return 0


if __name__ == "__main__":
    sys.exit(main())
