"""Quantize a GGUF model, like llama-quantize."""

from __future__ import annotations

from pathlib import Path

import typer


def quantize(
    inp: Path = typer.Argument(..., help="Input GGUF (F32/F16/BF16, or quantized with --allow-requantize)."),
    out: Path = typer.Argument(..., help="Output GGUF."),
    qtype: str = typer.Argument(..., metavar="TYPE", help="Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S/M/L Q4_K_S/M Q5_K_S/M Q6_K IQ4_NL IQ4_XS F16 BF16."),
    imatrix: Path = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix GGUF or legacy .dat)."),
    threads: int = typer.Option(0, "--threads", "-t", help="CPU threads (default: torch's; the native quantizers: all CPUs)."),
    pure: bool = typer.Option(False, "--pure", help="Every quantizable tensor gets TYPE (no mix)."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Allow re-quantizing already-quantized tensors (dequantized first)."),
    keep_mtp_type: str = typer.Option(None, "--keep-mtp-type", help="Tensor type for the MTP/NextN tensors (default: like the trunk)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print one line per tensor."),
) -> None:  # fmt: skip
    """Quantize IN to OUT with llama.cpp's per-tensor type mix for TYPE (byte-identical blocks)."""
    import time

    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from llmkit.core.gguf.imatrix import load_imatrix
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.core.gguf.writer import write_gguf_streaming
    from llmkit.core.outputs import check_output
    from llmkit.errors import LlmkitError
    from llmkit.quant.dequant import dequantize
    from llmkit.quant.mix import FTYPES, ModelInfo, choose_types, layer_of, parse_type
    from llmkit.quant.quantize import quantize as quantize_tensor

    name = parse_type(qtype)
    ftype, _ = FTYPES[name]
    mtp_type = None
    if keep_mtp_type is not None:
        key = keep_mtp_type.strip().upper()
        try:
            mtp_type = QT[key]
        except KeyError:
            mtp_type = None
        valid = {t for _, t in FTYPES.values()} | {QT.F32}
        if mtp_type not in valid:
            raise LlmkitError(
                f"unknown --keep-mtp-type {keep_mtp_type!r} "
                f"(valid: {', '.join(sorted(t.name for t in valid))})"
            )
    if not inp.is_file():
        raise LlmkitError(f"input file not found: {inp}")
    inputs = (inp, imatrix)  # OUT must replace neither (imatrix may be None)
    check_output(out, inputs)  # a bad OUT fails now, not after reading the model
    if threads > 0:
        from llmkit.kernels import cpu_native

        torch.set_num_threads(threads)
        if cpu_native.available():  # the native quantizers' pool
            cpu_native.set_threads(threads)

    gf = GGUFFile(inp)
    arch = gf.architecture
    md = gf.metadata
    info = ModelInfo.from_metadata(md)
    imat = load_imatrix(imatrix) if imatrix is not None else None

    # MTP / NextN tensors: blk.N.nextn.* and every tensor of the last nextn_predict_layers blocks
    n_nextn = int(md.get(f"{arch}.nextn_predict_layers", 0) or 0)
    first_mtp = info.n_layer - n_nextn if n_nextn else None

    def is_mtp(t: str) -> bool:
        return ".nextn." in t or (first_mtp is not None and layer_of(t) >= first_mtp)

    tensors = {n: (t.shape, t.qtype) for n, t in gf.tensors.items()}
    targets = choose_types(tensors, name, info, pure=pure, has_imatrix=imat is not None)
    if mtp_type is not None:
        for n, t in targets.items():
            if is_mtp(n) and t != tensors[n][1] and len(tensors[n][0]) >= 2:
                block = GGML_QUANT_SIZES[mtp_type][0]
                targets[n] = mtp_type if tensors[n][0][-1] % block == 0 else t
    for n, t in targets.items():
        cur = tensors[n][1]
        if t != cur and cur not in (QT.F32, QT.F16, QT.BF16) and not allow_requantize:
            raise LlmkitError(
                f"tensor {n} is already {cur.name}: requantizing is disabled "
                "(pass --allow-requantize to dequantize and quantize it again)"
            )

    md_out = {k: v for k, v in md.items() if not k.startswith("split.")}
    md_out.pop("general.alignment", None)
    md_out["general.quantization_version"] = 2
    md_out["general.file_type"] = ftype
    order = list(gf.tensors)  # keep the input's tensor order
    infos = [(n, gf.tensors[n].shape, targets[n]) for n in order]

    console = Console(stderr=True)
    size_in = sum(t.nbytes for t in gf.tensors.values())
    size_out = 0
    t0 = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]quantize"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} MiB"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("q", total=size_in / 2**20)

    def produce(n: str) -> np.ndarray:
        nonlocal size_out
        ti = gf.tensors[n]
        new = targets[n]
        raw = gf.raw(n)
        if new == ti.qtype:
            data = raw
            how = "copied"
        else:
            x = dequantize(torch.from_numpy(raw), ti.qtype, ti.shape)  # [..., n_per_row] fp32
            x = x.reshape(-1, ti.shape[-1])
            qw = None
            if imat is not None and new not in (QT.Q8_0, QT.F16, QT.BF16, QT.F32):
                e = imat.get(n)
                if e is not None:
                    n_mat = int(np.prod(ti.shape[:-2], dtype=np.int64)) if len(ti.shape) > 2 else 1
                    if e.size != n_mat * ti.shape[-1]:
                        raise LlmkitError(
                            f"imatrix size {e.size} is different from tensor size "
                            f"{n_mat * ti.shape[-1]} for {n}"
                        )
                    qw = torch.from_numpy(e).reshape(n_mat, ti.shape[-1])
            if qw is None or qw.shape[0] == 1:
                w1 = None if qw is None else qw[0]
                data = _chunked(quantize_tensor, x, new, w1).numpy()
            else:  # experts: one imatrix row per matrix
                rows = x.reshape(qw.shape[0], -1, ti.shape[-1])
                data = np.concatenate(
                    [
                        _chunked(quantize_tensor, rows[i], new, qw[i]).numpy()
                        for i in range(qw.shape[0])
                    ]
                )
            how = f"converting to {new.name}"
        size_out += data.nbytes
        if verbose:
            shape = ", ".join(str(d) for d in reversed(ti.shape))
            progress.console.print(
                f"{n:<40} - [{shape}], type = {ti.type_name:>6}, {how} .. "
                f"size = {ti.nbytes / 2**20:8.3f} MiB -> {data.nbytes / 2**20:8.3f} MiB",
                highlight=False,
            )
        progress.advance(task, ti.nbytes / 2**20)
        return data

    with progress:
        write_gguf_streaming(
            out, arch, md_out, infos, produce, alignment=gf.alignment, inputs=inputs
        )
    dt = time.perf_counter() - t0
    console.print(
        f"model size  = {size_in / 2**20:8.2f} MiB\nquant size  = {size_out / 2**20:8.2f} MiB "
        f"({name}, {dt:.1f} s, {size_in / 2**20 / max(dt, 1e-9):.1f} MiB/s)",
        highlight=False,
    )


def _chunked(fn, x, qtype, qw, rows_per_chunk: int = 0):
    """Quantize [R, n] in row chunks of ~4M values so temporaries stay bounded."""
    import torch

    n = x.shape[-1]
    step = max(1, (1 << 22) // n) if not rows_per_chunk else rows_per_chunk
    if x.shape[0] <= step:
        return fn(x, qtype, qw)
    return torch.cat([fn(x[i : i + step], qtype, qw) for i in range(0, x.shape[0], step)])
