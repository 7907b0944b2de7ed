"""The one visible place that decides how a GGUF weight is multiplied: by device, type and regime.

Today's CPU path (PyTorch): every supported GGUF type is dequantized once, at load time, into a dense
`[out, in]` matrix in the backend's weight dtype (bf16 by default, fp32 for exactness checks). The
regime decides the kernel:
  * GEMV (few rows: decode, MTP verify): `F.linear` in bf16 reads half the bytes of fp32, and decode
    is bandwidth-bound.
  * GEMM (prefill): on CPUs without native bf16 (AVX2-only, e.g. this EPYC VM) oneDNN emulates bf16
    and runs at ~20 GFLOP/s against ~170 for fp32, so the weight is upcast to fp32 per call (the
    upcast costs ~10% of the GEMM at M=512). CPUs with avx512_bf16/AMX keep bf16 throughout.
    Measured crossover on AVX2 (640x4096): bf16 wins at M <= 2, upcast from M = 4.
Several weights that consume the same input (q/k/v, gate/up) are concatenated into one matrix so a
decode step makes one call instead of three. The dequantized copy is reported as backend memory.

Regime/type-specific kernels (Triton GEMV/GEMM on GPU, packed int4/int8 on CPU) plug in here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.core.errors import LlmkitError
from llmkit.core.weights import QTensor
from llmkit.quant.dequant import SUPPORTED_TYPES

GEMV_MAX_ROWS = 16  # M <= this is the GEMV regime (decode, MTP verify); larger M is GEMM (prefill)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 / amx_bf16 (x86) or bf16 (arm64) in /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def bf16_max_rows() -> int:
    """Largest M for which the bf16 kernel beats upcasting the weight to fp32."""
    return 1 << 30 if cpu_has_native_bf16() else 2


@dataclass
class Backend:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weight_dtype: torch.dtype = torch.bfloat16
    extra_bytes: int = 0  # bytes of prepared (dequantized/repacked) weights this backend holds


class DenseLinear:
    """y[T, out] = x[T, in] @ W^T with W dequantized once into the backend dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]
        self.out_features, self.in_features = weight.shape
        self.low_rows = bf16_max_rows() if weight.dtype == torch.bfloat16 else 1 << 30

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, in] fp32 -> [M, out] fp32
        if x.shape[0] <= self.low_rows:
            return F.linear(x.to(self.weight.dtype), self.weight).float()
        return F.linear(x, self.weight.float())


def make_linear(backend: Backend, *weights: QTensor):
    """A matmul over one weight, or over several fused along the output dim (same input width)."""
    in_features = {w.shape[-1] for w in weights}
    if len(in_features) != 1:
        raise LlmkitError(f"cannot fuse {[w.name for w in weights]}: different input widths")
    for w in weights:
        if w.qtype not in SUPPORTED_TYPES:
            raise LlmkitError(f"no matmul kernel for {w.qtype.name} (tensor {w.name})")
    if backend.device.type != "cpu":
        raise LlmkitError(f"device {backend.device.type} is not supported yet (use --device cpu)")
    parts = [w.dequantize(torch.float32).to(backend.weight_dtype) for w in weights]
    dense = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    backend.extra_bytes += dense.numel() * dense.element_size()
    return DenseLinear(dense.to(backend.device))
