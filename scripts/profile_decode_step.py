"""Where a GPU decode step goes: kernels per step and graph-replay time, per variant.

    python scripts/profile_decode_step.py MODEL.gguf [--ctx 1024] [--prompt 100]

Variants (measured in one process, so on the same GPU): "triton-rope" (RoPE through
kernels/triton_rope.py for every mode) and "torch-rope" (through torch ops, as NORM-mode models
run by default). For each: the CUDA
kernels one decode step launches (torch profiler over one eager static step), the step's time
replayed as a CUDA graph (median of 100 replays, CUDA events), and the eager step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=100)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode_step: needs a CUDA device")
        return 1
    from torch.profiler import ProfilerActivity, profile

    from llmkit.core.model.cuda_graph import GraphDecoder
    from llmkit.core.models.loader import load_model
    from llmkit.kernels import ops, torch_ops, triton_rope

    lm = load_model(args.model, device="cuda")
    model = lm.model.model  # the architecture's model inside OnDevice
    table_rope = ops.rope  # the kernel table's choice, restored after the variants
    rows = []
    for variant in ("triton-rope", "torch-rope"):
        # every mode through the Triton kernel (the table: NEOX only), or every mode in torch
        ops.rope = triton_rope.rope if variant == "triton-rope" else torch_ops.rope
        with torch.inference_mode():
            cache = lm.new_cache(args.ctx)
            model.forward(torch.arange(3, 3 + args.prompt, device="cuda"), cache)
            dec = GraphDecoder(model, cache)
            tok = torch.tensor([7])
            dec(tok)  # eager static step, then capture
            b = dec.bucket(cache.n_past)
            graph, _ = dec.graphs[b]
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                dec._step(b)
                torch.cuda.synchronize()
            kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
            replay = _median_ms(graph.replay, 100)
            t0 = time.perf_counter()
            for _ in range(20):
                dec._step(b)
            torch.cuda.synchronize()
            eager = (time.perf_counter() - t0) / 20 * 1e3
        rows.append((variant, kernels, replay, eager))
    ops.rope = table_rope
    print(f"{torch.cuda.get_device_name()}: {args.model}, position {args.prompt}")
    print("| variant | CUDA kernels per step | graph replay ms | tok/s | eager step ms |")
    print("|---|---:|---:|---:|---:|")
    for v, k, r, e in rows:
        print(f"| {v} | {k} | {r:.3f} | {1e3 / r:.0f} | {e:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
