"""The kernel table: the one place that decides which implementation runs each op, by device,
weight type and regime. Models call these functions and never look at the device themselves.

  op            | device cpu                                  | device cuda ("triton" family)
  --------------+---------------------------------------------+-------------------------------------
  linear        | Q4_0 Q4_1 Q4_K (bf16 mode): packed int4      | Q8_0 Q4_0 Q4_1 Q5_0 Q4_K Q5_K Q6_K
  (make_linear) |   (cpu_int4) for M <= 64, else dequantize   |   IQ4_XS: triton_gemv on the GGUF
                |   the blocks per call + fp32 GEMM           |   bytes for M <= 16, else
                | other types: dense copy in weight_dtype     |   triton_dequant + cuBLAS;
                |   (linear_torch: bf16 M=1 kernel, row by    | F32 F16 BF16: torch in the stored
                |   row on CPUs without native bf16)         |   dtype; others: LlmkitError
  attention     | torch SDPA over a [T, S] bool mask          | triton_attention (reads the cache in
                |   (the cache dequantizes q8_0/q4_0 rows)    |   place, masks by slot position)
  rope          | torch                                       | Triton for NEOX; torch for NORM
                |                                             |   (measured faster in a graph)
  rms_norm      | torch                                       | torch
  add_rms_norm  | torch (add, then norm)                      | triton_fused (one launch)
  glu           | torch                                       | triton_fused (one launch)

Regimes: GEMV (M <= GEMV_MAX_ROWS rows: decode, MTP verify) and GEMM (prefill chunks). Weights
that consume the same input (q/k/v, gate/up) are fused into one call when they can be. Every
prepared byte (packed or dequantized copies, device copies) is counted in `Backend.extra_bytes`.
Capabilities that depend on the attention kernel (draft-tree masks, CUDA-graph capture) are
answered here too, so callers do not test kernel names.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_int4, torch_ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.linear_torch import DenseLinear, ExpertLinear
from llmkit.kernels.linear_triton import FLOAT_TYPES, TritonLinear
from llmkit.kernels.rope import ROPE_NEOX
from llmkit.quant.dequant import SUPPORTED_TYPES
from llmkit.quant.tensor import QTensor

INT4_MAX_ROWS = 64  # packed int4 beats dequantize + fp32 GEMM up to about this M (measured)
ATTENTION_KERNELS = ("torch", "triton")

# -- linear ---------------------------------------------------------------------------------------


def _check_types(weights: tuple[QTensor, ...], kernels: str) -> None:
    if kernels == "triton":
        from llmkit.kernels.triton_gemv import SUPPORTED_TYPES as quantized

        supported = quantized | FLOAT_TYPES
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
    """A matmul over one weight, or over several fused along the output dim (same input width):
    a callable x [M, in] fp32 -> [M, out] fp32 with `in_features` and `out_features`."""
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


# -- small ops --------------------------------------------------------------------------------------

rms_norm = torch_ops.rms_norm  # one fused torch op on every device
gelu_tanh, silu = torch_ops.gelu_tanh, torch_ops.silu


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + r: the residual step and the next norm."""
    if x.is_cuda:
        from llmkit.kernels.triton_fused import rms_norm as fused

        return fused(x, weight, eps, residual=r)
    return torch_ops.add_rms_norm(x, r, weight, eps)


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2F] (gate | up) -> act(gate) * up; act "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if gate_up.is_cuda:
        from llmkit.kernels.triton_fused import glu as fused

        return fused(gate_up, act)
    return torch_ops.glu(gate_up, act)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int) -> torch.Tensor:
    """x [T, H, D]: rotate the first 2 * cos.shape[-1] dims (NORM: adjacent pairs, NEOX: halves).
    NORM stays on torch on a GPU: its 2 kernels measured faster than the Triton launch in a
    graph-replayed step (1.83 against 1.92 ms per step of a 1.1B llama on an H100)."""
    if x.is_cuda and mode == ROPE_NEOX:
        from llmkit.kernels.triton_rope import rope as triton_rope

        return triton_rope(x, cos, sin, mode)
    return torch_ops.rope(x, cos, sin, mode)


# -- attention ----------------------------------------------------------------------------------------


def kernel_family(device: torch.device | str) -> str:
    """The kernel family a device runs by default: "triton" on a GPU, else "cpu"."""
    return "triton" if torch.device(device).type == "cuda" else "cpu"


def attention_kernel(family: str) -> str:
    """The attention implementation of a kernel family: the Triton kernel for "triton" (on a GPU,
    or under TRITON_INTERPRET=1 in tests), SDPA over a mask for "cpu"."""
    return "triton" if family == "triton" else "torch"


def check_attention_kernel(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise LlmkitError(
            f"unknown attention kernel {kernel!r} (use {', '.join(ATTENTION_KERNELS)})"
        )


def supports_tree_masks(kernel: str) -> bool:
    """Draft-tree batches need an arbitrary [T, S] mask (siblings share a position): the torch
    path takes one; the Triton kernel masks by slot position."""
    return kernel == "torch"


def supports_graph_capture(kernel: str) -> bool:
    """CUDA-graph replay needs attention that masks by slot position with no host reads."""
    return kernel == "triton"


def attention_torch(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA over a [T, S] mask (the torch row of the table)."""
    return torch_ops.attention(q, k, v, mask, scale)


def attention_triton(q, k, v, kpos, qpos, scale: float, window, k_type=None, v_type=None):
    """The Triton kernel over the cache as stored (f16, or q8_0 / q4_0 blocks named by type)."""
    from llmkit.kernels.triton_attention import attention as triton_attention

    return triton_attention(q, k, v, kpos, qpos, scale, window, k_type=k_type, v_type=v_type)
