"""The one visible place that decides how a GGUF weight is multiplied: by device, type and regime.

Regimes: GEMV (M <= GEMV_MAX_ROWS rows: decode, MTP verify) and GEMM (prefill chunks).

  kernels  | type                        | GEMV (M <= 16)                  | GEMM (M > 16)
  ---------+-----------------------------+---------------------------------+------------------------
  "cpu"    | Q4_0, Q4_1, Q4_K (bf16 mode)| packed int4 (cpu_int4), M <= 64  | dequantize blocks per
           |                             | rows                            | call, fp32 GEMM
  "cpu"    | every other supported type  | dense copy: bf16 M=1 kernel,    | fp32 GEMM (bf16 copy
           | (and all types in fp32 mode)| row by row on AVX2-only CPUs    | upcast on AVX2)
  "triton" | Q8_0 Q4_0 Q4_1 Q5_0 Q4_K    | triton_gemv on the GGUF bytes   | triton_dequant to
           | Q5_K Q6_K IQ4_XS            | (split-K, H100-tuned launches)  | bf16, cuBLAS GEMM
  "triton" | F32 F16 BF16                | torch matmul in the stored dtype (cuBLAS)
  "triton" | anything else               | LlmkitError naming the type     |

Why the CPU rows: on CPUs without native bf16 (AVX2-only, e.g. this 2-vCPU EPYC VM), oneDNN
emulates bf16, so a bf16 matmul costs linear in M; running the M = 1 kernel row by row costs the
same and gives every row exactly the arithmetic of a single-token step, which keeps greedy MTP output
token-for-token identical to plain decoding (bf16 logits tie often). The packed int4 kernel is
row-independent by construction (tested) and 3-4x cheaper than bf16 at M = 4. A GEMM upcasts to
fp32 (emulated bf16 GEMM runs ~20 GFLOP/s against ~170 for fp32). CPUs with avx512_bf16/AMX run
the dense bf16 path for every M. `weight_dtype=float32` keeps exact fp32 copies (reference checks).

"triton" is the GPU family (device cuda); on CPU it runs under TRITON_INTERPRET=1 for tests only.
Weights that consume the same input (q/k/v, gate/up) are fused into one call when they can be.
Every prepared byte (packed or dequantized copies, device copies) is counted in
`Backend.extra_bytes`, which the memory report shows.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_int4
from llmkit.quant.dequant import SUPPORTED_TYPES
from llmkit.quant.tensor import QTensor

GEMV_MAX_ROWS = 16  # M <= this is the GEMV regime (decode, MTP verify); larger M is GEMM (prefill)
INT4_MAX_ROWS = 64  # packed int4 beats dequantize + fp32 GEMM up to about this M (measured)
KERNEL_FAMILIES = ("cpu", "triton")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 / amx_bf16 (x86) or bf16 (arm64) in /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


@dataclass
class Backend:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weight_dtype: torch.dtype = torch.bfloat16
    kernels: str | None = None  # "cpu" | "triton"; None = by device (cuda -> triton)
    extra_bytes: int = 0  # bytes of prepared (packed/dequantized/device) weights this backend holds

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.kernels is None:
            self.kernels = "triton" if self.device.type == "cuda" else "cpu"
        if self.kernels not in KERNEL_FAMILIES:
            raise LlmkitError(f"unknown kernel family {self.kernels!r} ({KERNEL_FAMILIES})")
        if self.kernels == "cpu" and self.device.type != "cpu":
            raise LlmkitError(f"cpu kernels cannot run on device {self.device}")


def _dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] fp32 @ w [out, in]^T -> [M, out] fp32 for a dense copy, kernel by regime."""
    if w.dtype != torch.bfloat16:
        return F.linear(x, w)
    m = x.shape[0]
    if m == 1 or cpu_has_native_bf16():
        return F.linear(x.to(torch.bfloat16), w).float()
    if m <= GEMV_MAX_ROWS:
        return torch.cat([F.linear(x[i : i + 1].to(torch.bfloat16), w) for i in range(m)]).float()
    return F.linear(x, w.float())


class DenseLinear:
    """y[M, out] = x[M, in] @ W^T with W dequantized once into the backend dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _dense_matmul(x, self.weight)  # [M, in] fp32 -> [M, out] fp32


_STORED_DTYPE = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
_FLOAT_TYPES = frozenset(_STORED_DTYPE)


def _merge_same_type(parts: list) -> list:
    """Adjacent fused parts of one type (same row width) become one tensor: one kernel launch
    instead of one per part plus a concatenation (q/k/v and gate/up are usually one type)."""
    out = []
    for qt, run in itertools.groupby(parts, key=lambda p: p[1]):
        run = list(run)
        rows = sum(shape[0] for _, _, shape in run)
        data = run[0][0] if len(run) == 1 else torch.cat([a for a, _, _ in run])
        out.append((data, qt, (rows, *run[0][2][1:])))
    return out


class TritonLinear:
    """GEMV straight from the GGUF bytes (one call per run of same-type fused parts); GEMM on a
    per-call dequantized copy. Float-typed weights (F32/F16/BF16) stay in their stored dtype and
    are plain torch matmuls in that dtype (cuBLAS on a GPU: the "bf16 weights and torch matmuls"
    baseline of the benchmarks). Everything lives on the backend device."""

    def __init__(self, weights: list[QTensor], device: torch.device):
        self.parts = []  # (uint8 bytes [N, row_bytes] or dense [N, K] in the stored dtype, ...)
        for w in weights:
            if w.qtype in _FLOAT_TYPES:
                self.parts.append(
                    (w.dequantize(_STORED_DTYPE[w.qtype]).to(device), w.qtype, w.shape)
                )
            else:
                raw = w.raw.reshape(w.shape[0], -1).view(torch.uint8)
                self.parts.append((raw.to(device), w.qtype, w.shape))
        self.parts = _merge_same_type(self.parts)
        self.out_features = sum(s[0] for _, _, s in self.parts)
        self.in_features = weights[0].shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a, _, _ in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from llmkit.kernels.triton_dequant import qdequant  # triton imports only when used
        from llmkit.kernels.triton_gemv import qgemv
        from llmkit.quant.dequant import dequantize

        gemv = x.shape[0] <= GEMV_MAX_ROWS
        dt = torch.float32 if x.device.type == "cpu" else torch.bfloat16  # GEMM operand dtype
        ys = []
        for a, qt, shape in self.parts:
            if qt in _FLOAT_TYPES:
                ys.append(F.linear(x.to(a.dtype), a).float())
            elif gemv:
                ys.append(qgemv(x, a, qt))  # [M, N] fp32, fp32 accumulation
            else:
                w = (  # [N, K]: one Triton pass on a GPU; the torch decoders on CPU
                    qdequant(a, qt, dt)
                    if a.device.type == "cuda"
                    else dequantize(a, qt, shape, dtype=dt)
                )
                ys.append(F.linear(x.to(dt), w).float())
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def _check_types(weights: tuple[QTensor, ...], kernels: str) -> None:
    if kernels == "triton":
        from llmkit.kernels.triton_gemv import SUPPORTED_TYPES as quantized

        supported = quantized | _FLOAT_TYPES
    else:
        supported = SUPPORTED_TYPES
    for w in weights:
        if w.qtype not in supported:
            raise LlmkitError(
                f"no {kernels} matmul kernel for {w.qtype.name} (tensor {w.name}); supported: "
                + ", ".join(sorted(t.name for t in supported))
            )


def _int4_ok(backend: Backend, weights: tuple[QTensor, ...]) -> bool:
    return (
        backend.weight_dtype == torch.bfloat16
        and cpu_int4.available()
        and all(w.qtype in cpu_int4.PACKABLE_TYPES and len(w.shape) == 2 for w in weights)
        and weights[0].shape[-1] % cpu_int4.GROUP == 0
        and sum(w.shape[0] for w in weights) % cpu_int4.N_MULTIPLE == 0
    )


def make_linear(backend: Backend, *weights: QTensor):
    """A matmul over one weight, or over several fused along the output dim (same input width)."""
    in_features = {w.shape[-1] for w in weights}
    if len(in_features) != 1:
        raise LlmkitError(f"cannot fuse {[w.name for w in weights]}: different input widths")
    _check_types(weights, backend.kernels)
    if backend.kernels == "triton":
        lin = TritonLinear(list(weights), backend.device)
        backend.extra_bytes += lin.nbytes
        return lin
    if _int4_ok(backend, weights):
        lin = cpu_int4.Int4Linear(list(weights), INT4_MAX_ROWS)
        backend.extra_bytes += lin.nbytes
        return lin
    parts = [w.dequantize(torch.float32).to(backend.weight_dtype) for w in weights]
    dense = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    backend.extra_bytes += dense.numel() * dense.element_size()
    return DenseLinear(dense)


class ExpertLinear:
    """y[M, out] = x[M, in] @ W[e]^T for one expert e of a stacked [E, out, in] weight (MoE): only
    the experts a batch selects are ever multiplied."""

    def __init__(self, experts: list):
        self.experts = experts  # one linear per expert
        self.n_expert = len(experts)
        self.out_features, self.in_features = experts[0].out_features, experts[0].in_features

    def __call__(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        # x: [M, in] fp32, the rows routed to this expert -> [M, out] fp32
        return self.experts[expert](x)


def make_expert_linear(backend: Backend, qt: QTensor) -> ExpertLinear:
    """Per-expert matmuls over a 3-D expert tensor (numpy shape (E, out, in))."""
    if len(qt.shape) != 3:
        raise LlmkitError(
            f"{qt.name}: expert tensor must be 3-D (E, out, in), got {list(qt.shape)}"
        )
    _check_types((qt,), backend.kernels)
    n_expert, out, inp = qt.shape
    experts = [
        make_linear(backend, QTensor(f"{qt.name}[{e}]", qt.qtype, (out, inp), qt.raw[e]))
        for e in range(n_expert)
    ]
    return ExpertLinear(experts)
