"""Write a synthetic llama GGUF of a chosen size and weight type, for GPU decode benchmarks.

    python scripts/make_synthetic_model.py OUT.gguf [--type Q4_K|Q8_0|BF16|F16] [--preset 1b]

The real models we can reach (135M and 270M parameters) are too small to show whether decode
reaches the memory-bandwidth bound on a GPU: a ~1.1B-parameter model (Llama-3.2-1B shapes,
preset `1b`) is. Weights are random but well-formed: one [ROWS, K] sample per input width is
quantized with llmkit's own quantizer and repeated down the rows, so writing a 1B model takes
seconds instead of quantizing a billion weights. Every tensor still has its own bytes in the file
(nothing is shared in memory), so a decode step reads the full model like a real one.
`output.weight` is Q6_K when the trunk is quantized (as in llama.cpp's Q4_K_M), otherwise the
trunk type. The vocabulary is the tests' small SPM vocabulary padded with filler pieces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the SPM vocabulary)

from llmkit.core.gguf.writer import write_gguf_streaming  # noqa: E402
from llmkit.quant.quantize import quantize  # noqa: E402
from tests.tiny_models import spm_vocab  # noqa: E402

PRESETS = {
    # name: (n_embd, n_layer, n_ff, n_head, n_head_kv, n_vocab)
    "1b": (2048, 16, 8192, 32, 8, 32000),
    "300m": (1024, 16, 4096, 16, 4, 32000),
    "tiny": (256, 2, 512, 4, 2, 512),
}
ROWS = 256  # rows per quantized sample (repeated down each tensor)


def _sample(qtype: QT, k: int, seed: int) -> np.ndarray:
    """Encoded bytes of a [ROWS, k] random matrix, uint8 [ROWS, row_bytes]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, k, generator=g) * 0.02
    if qtype == QT.BF16:
        return w.to(torch.bfloat16).view(torch.uint8).numpy()
    if qtype == QT.F16:
        return w.to(torch.float16).view(torch.uint8).numpy()
    return quantize(w, qtype).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", default="Q4_K", help="trunk weight type: Q4_K, Q8_0, BF16, F16, ...")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    try:
        qtype = QT[args.type.upper()]
    except KeyError:
        print(f"error: unknown weight type {args.type}", file=sys.stderr)
        return 2
    H, L, F, nh, nkv, V = PRESETS[args.preset]
    hd = H // nh
    out_type = QT.Q6_K if qtype not in (QT.BF16, QT.F16, QT.F32) else qtype
    md = {
        "llama.context_length": 8192,
        "llama.embedding_length": H,
        "llama.block_count": L,
        "llama.feed_forward_length": F,
        "llama.attention.head_count": nh,
        "llama.attention.head_count_kv": nkv,
        "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": hd,
        "general.name": f"synthetic-{args.preset}-{qtype.name}",
        **spm_vocab(V),
    }
    infos = [("token_embd.weight", (V, H), qtype), ("output_norm.weight", (H,), QT.F32)]
    infos.append(("output.weight", (V, H), out_type))
    for i in range(L):
        b = f"blk.{i}."
        infos += [
            (b + "attn_norm.weight", (H,), QT.F32),
            (b + "attn_q.weight", (nh * hd, H), qtype),
            (b + "attn_k.weight", (nkv * hd, H), qtype),
            (b + "attn_v.weight", (nkv * hd, H), qtype),
            (b + "attn_output.weight", (H, nh * hd), qtype),
            (b + "ffn_norm.weight", (H,), QT.F32),
            (b + "ffn_gate.weight", (F, H), qtype),
            (b + "ffn_up.weight", (F, H), qtype),
            (b + "ffn_down.weight", (H, F), qtype),
        ]
    samples: dict[tuple[QT, int], np.ndarray] = {}
    shapes = {name: (shape, qt) for name, shape, qt in infos}

    def produce(name: str) -> np.ndarray:
        shape, qt = shapes[name]
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)
        n, k = shape
        key = (qt, k)
        if key not in samples:
            samples[key] = _sample(qt, k, seed=len(samples))
        s = samples[key]
        return np.tile(s, (-(-n // ROWS), 1))[:n]

    write_gguf_streaming(args.out, "llama", md, infos, produce)
    n_params = sum(int(np.prod(s)) for _, s, _ in infos)
    size = args.out.stat().st_size
    print(f"{args.out}: {n_params / 1e9:.2f}B parameters, {qtype.name}, {size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
