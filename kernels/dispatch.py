"""The one visible place that decides how a GGUF weight is multiplied: by device, type and regime.

Today's CPU path (PyTorch): every supported GGUF type is dequantized once, at load time, into a dense
`[out, in]` matrix in the backend's weight dtype (bf16 by default, fp32 for exactness checks).
`_matmul` picks the kernel by regime:
  * M = 1 (decode): `F.linear` in bf16 reads half the bytes of fp32; decode is bandwidth-bound.
  * 2 <= M <= GEMV_MAX_ROWS (MTP verify, prompt tails) on CPUs without native bf16 (AVX2-only, e.g.
    this EPYC VM): oneDNN emulates bf16, so its cost is linear in M; running the M = 1 kernel row by
    row costs the same (4 x 0.28 ms vs 1.0 ms upcast at 640x4096, M = 4) and gives every row exactly
    the arithmetic of a single-token step, which keeps greedy MTP output token-for-token identical
    to plain decoding (bf16 logits tie often; different kernels would break ties differently).
  * GEMM (prefill chunks): without native bf16 the weight is upcast to fp32 per call (emulated bf16
    GEMM runs at ~20 GFLOP/s against ~170 for fp32; the upcast costs ~10% at M = 512).
  CPUs with avx512_bf16/AMX run bf16 for every M.
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


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] fp32 @ w [out, in]^T -> [M, out] fp32, kernel chosen by regime (see above)."""
    if w.dtype != torch.bfloat16:
        return F.linear(x, w)
    m = x.shape[0]
    if m == 1 or cpu_has_native_bf16():
        return F.linear(x.to(torch.bfloat16), w).float()
    if m <= GEMV_MAX_ROWS:
        return torch.cat([F.linear(x[i : i + 1].to(torch.bfloat16), w) for i in range(m)]).float()
    return F.linear(x, w.float())


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.weight)  # [M, in] fp32 -> [M, out] fp32


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


class ExpertLinear:
    """y[M, out] = x[M, in] @ W[e]^T for one expert e of a stacked [E, out, in] weight (MoE)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [E, out, in]
        self.n_expert, self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        # x: [M, in] fp32, the rows routed to this expert -> [M, out] fp32
        return _matmul(x, self.weight[expert])


def make_expert_linear(backend: Backend, qt: QTensor) -> ExpertLinear:
    """Per-expert matmuls over a 3-D expert tensor (numpy shape (E, out, in)), dequantized once."""
    if len(qt.shape) != 3:
        raise LlmkitError(
            f"{qt.name}: expert tensor must be 3-D (E, out, in), got {list(qt.shape)}"
        )
    if qt.qtype not in SUPPORTED_TYPES:
        raise LlmkitError(f"no matmul kernel for {qt.qtype.name} (tensor {qt.name})")
    if backend.device.type != "cpu":
        raise LlmkitError(f"device {backend.device.type} is not supported yet (use --device cpu)")
    dense = qt.dequantize(torch.float32).to(backend.weight_dtype)  # [E, out, in]
    backend.extra_bytes += dense.numel() * dense.element_size()
    return ExpertLinear(dense.to(backend.device))
