"""The kernel table: the one place that decides which implementation runs each op, by device,
kernel family (kernels/backend.py), weight type and regime. Models call these functions and never
look at the device themselves.

  op           | "cpu" (native, default on a CPU)  | "torch" (reference)  | "triton" (GPU)
  -------------+-----------------------------------+----------------------+------------------------
  linear       | cpu_native.NativeLinear on the     | dense copy in        | Q8_0 Q4_0 Q4_1 Q5_0
  (make_linear,|   GGUF bytes, every type (x86:     |   weight_dtype,      |   Q4_K Q5_K Q6_K IQ4_XS:
   linear)     |   the 32-value types and Q4_K-Q6_K |   F.linear; the      |   triton_gemv (M <= 16)
               |   moved into x8 groups, cpu_pack); |   fused steps as     |   or triton_dequant +
               |   the norm / GLU before and the    |   torch ops          |   cuBLAS; F32/F16/BF16
               |   post-norm / residual after fused |                      |   in their dtype
               |   in one call                      |                      |
  attention    | cpu_ops.attention: the cache as    | SDPA over a [T, S]   | triton_attention (the
               |   stored, masked by position (or a |   mask, q-types      |   cache as stored,
               |   tree mask), batch-invariant      |   dequantized        |   masked by position)
               | turbo3 / turbo4 KV: always torch   | (q rotated, output   | turbo: torch
               |   (kv_attention_kernel)            |   un-rotated)        |
  rope, norm,  | cpu_ops (one native call; RoPE     | torch                | NEOX RoPE, RMSNorm,
  glu          |   with the per-head norm fused)    |                      |   GLU: Triton
  whole block  | cpu_block (M <= 8 rows on the      | -                    | -
  (block_site) |   native KV cache: one call for    |                      |
               |   linears, RoPE, KV write, attn)   |                      |
  embedding    | cpu_ops.EmbedRows (rows decoded    | QTensor.rows         | QTensor.rows
               |   from the GGUF blocks)            |                      |

The small ops (rope, rms_norm, glu) are chosen by the tensor's device: native on a CPU when the
library is built, else torch; Triton for the fused GPU ones. Regimes: GEMV (M <= GEMV_MAX_ROWS
rows: decode, MTP verify) and GEMM (prefill chunks); the native CPU kernels use one arithmetic for
every M (a row's result never depends on the batch: what keeps MTP verification lossless).
Weights that consume the same input (q/k/v, gate/up) are fused into one call. Every prepared
byte (dense or device copies) is counted in `Backend.extra_bytes`. Capabilities that depend on
the attention kernel (draft-tree masks, CUDA-graph capture) are answered here too.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_block, cpu_native, cpu_ops, cpu_pack, native_abi, torch_ops
from llmkit.kernels.backend import Backend
from llmkit.kernels.linear_torch import DenseLinear, ExpertLinear
from llmkit.kernels.linear_triton import FLOAT_TYPES, TritonLinear
from llmkit.kernels.rope import ROPE_NEOX
from llmkit.quant.dequant import SUPPORTED_TYPES
from llmkit.quant.tensor import QTensor

ATTENTION_KERNELS = ("native", "torch", "triton")
_NATIVE = cpu_native.available()

# -- linear ---------------------------------------------------------------------------------------


def set_threads(n: int) -> None:
    """The CPU threads of a run: the native pool gets n; PyTorch gets one when the native
    library computes (its OpenMP workers spin after each parallel op and take the pool's cores:
    SmolLM2 pp512 650-740 -> 880-970 tok/s, decode after a real prompt ~105 -> ~157 tok/s on 2
    cores), all n otherwise."""
    if cpu_native.available():
        cpu_native.set_threads(n)
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(n)


def _check_types(weights: tuple[QTensor, ...], kernels: str) -> None:
    if kernels == "triton":
        from llmkit.kernels.triton_gemv import SUPPORTED_TYPES as quantized

        supported = quantized | FLOAT_TYPES
    elif kernels == "cpu":
        supported = cpu_native.SUPPORTED_TYPES
    else:
        supported = SUPPORTED_TYPES
    for w in weights:
        if w.qtype not in supported:
            raise LlmkitError(
                f"no {kernels} matmul kernel for {w.qtype.name} (tensor {w.name}); supported: "
                + ", ".join(sorted(t.name for t in supported))
            )


def make_linear(backend: Backend, *weights: QTensor):
    """A matmul over one weight, or over several fused along the output dim (same input width):
    a callable x [M, in] fp32 -> [M, out] fp32 with `in_features` and `out_features`."""
    in_features = {w.shape[-1] for w in weights}
    if len(in_features) != 1:
        raise LlmkitError(f"cannot fuse {[w.name for w in weights]}: different input widths")
    _check_types(weights, backend.kernels)
    if backend.kernels == "cpu":  # the GGUF bytes, in place or moved into x8 groups
        backend.linear_bytes += sum(w.nbytes for w in weights)
        lin = cpu_native.NativeLinear(
            [(w.raw.reshape(w.shape[0], -1).view(torch.uint8), w.qtype, w.shape) for w in weights],
            release=all(w.mapped for w in weights),
            pack=backend.repack,
        )
        backend.packed += lin.bound.packed  # numpy (source rows, x8 groups)
        return lin
    if backend.kernels == "triton":
        lin = TritonLinear(list(weights), backend.device)
        backend.extra_bytes += lin.nbytes
        backend.linear_bytes += lin.nbytes
        return lin
    parts = [w.dequantize(torch.float32).to(backend.weight_dtype) for w in weights]
    dense = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    nbytes = dense.numel() * dense.element_size()
    backend.extra_bytes += nbytes
    backend.linear_bytes += nbytes
    return DenseLinear(dense)


def linear(lin, x: torch.Tensor, norm=None, glu_act: str | None = None, post_norm=None,
           residual: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y = residual + post_norm(lin(glu(norm(x)))), each step optional: `norm` / `post_norm` are
    (weight, eps) RMSNorms, `glu_act` "silu" or "gelu_tanh" for a GLU over an [M, 2K] input. One
    native call on a CPU; the same ops one by one elsewhere. `out`: a buffer the native call
    writes (and returns) instead of a fresh tensor; other paths ignore it (use the result)."""
    if (
        isinstance(lin, cpu_native.NativeLinear)
        and x.dtype == torch.float32
        and x.is_contiguous()
        and (residual is None or residual.is_contiguous())
    ):
        # the cpu family computes what llama.cpp's CPU backend does: its GELU reads an fp16 table
        act = native_abi.native_glu(glu_act)
        return lin.fused(x, norm, act, post_norm, residual, out)
    h = rms_norm(x, *norm) if norm is not None else x
    h = lin(glu(h, glu_act) if glu_act else h)
    if post_norm is not None:
        h = rms_norm(h, *post_norm)
    return h if residual is None else residual + h


def linear_site(lin, norm=None, glu_act: str | None = None, post_norm=None):
    """`linear` bound to one call site of a native CPU linear (cpu_native.NativeLinear.site):
    a callable (x, residual=None, out=None), for per-thread step buffers; None on other paths."""
    if not isinstance(lin, cpu_native.NativeLinear):
        return None
    return lin.site(norm, native_abi.native_glu(glu_act), post_norm)


def rope_site(x: torch.Tensor, mode: int, norm=None, scale: float = 1.0):
    """`rope(x, ..., inplace=True)` bound to a buffer view x (cpu_ops.RopeSite): a callable
    (cos, sin) that rotates x in place; None off the native CPU path."""
    if not _NATIVE or x.is_cuda:
        return None
    return cpu_ops.RopeSite(x, mode, norm, scale)


def gather_rows(qt: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """qt's rows `ids` as bytes (a copy, for a row subset's own linear). From a file mapping on a
    CPU the mapping's pages are dropped as the rows are read (cpu_pack.gather_rows): a packed,
    tied LM head does not come back into memory for a draft head's shortlist."""
    if qt.mapped and qt.raw.device.type == "cpu" and cpu_native.available():
        rows = qt.raw.reshape(qt.shape[0], -1)
        got = cpu_pack.gather_rows(cpu_native.library(), rows.numpy(), ids.cpu().numpy())
        return torch.from_numpy(got)
    return qt.raw[ids.to(qt.raw.device)]


def make_expert_linear(backend: Backend, qt: QTensor) -> ExpertLinear:
    """Per-expert matmuls over a 3-D expert tensor (numpy shape (E, out, in))."""
    if len(qt.shape) != 3:
        raise LlmkitError(
            f"{qt.name}: expert tensor must be 3-D (E, out, in), got {list(qt.shape)}"
        )
    _check_types((qt,), backend.kernels)
    n_expert, out, inp = qt.shape
    experts = [
        make_linear(backend, QTensor(f"{qt.name}[{e}]", qt.qtype, (out, inp), qt.raw[e], qt.mapped))
        for e in range(n_expert)
    ]
    return ExpertLinear(experts)


# -- small ops --------------------------------------------------------------------------------------

gelu_tanh, silu = torch_ops.gelu_tanh, torch_ops.silu


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., n] / sqrt(mean(x^2) + eps) * weight (GGUF norms already include Gemma's +1)."""
    if x.is_cuda:
        from llmkit.kernels.triton_fused import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    if _NATIVE and not x.requires_grad:
        return cpu_ops.rms_norm(x, weight, eps)
    return torch_ops.rms_norm(x, weight, eps)


def rms_norm_cat(parts: tuple, eps: float) -> torch.Tensor:
    """torch.cat([rms_norm(x, w, eps) for x, w in parts], -1) for parts of the same leading shape:
    on the native CPU path each part is normed straight into its columns (one output)."""
    if _NATIVE and not any(x.is_cuda or x.requires_grad for x, _ in parts):
        return cpu_ops.rms_norm_cat(parts, eps)
    return torch.cat([rms_norm(x, w, eps) for x, w in parts], -1)


def argmax(x: torch.Tensor) -> int:
    """The index of the first maximum of a 1-D row (greedy sampling), as torch.argmax: native
    on the CPU path (torch's is single-threaded and ~10x slower on a 262k vocabulary row)."""
    if _NATIVE and not x.is_cuda and x.dim() == 1 and x.dtype == torch.float32:
        return cpu_ops.argmax(x)
    return int(torch.argmax(x))


def argmax_prob(x: torch.Tensor) -> tuple[int, float]:
    """argmax(x) and the softmax probability of that entry (a greedy draft's token and its
    confidence for --draft-p-min): one native call on the CPU path, where torch.softmax costs
    ~50 us on a draft row right after a streamed weight matrix."""
    if _NATIVE and not x.is_cuda and x.dim() == 1 and x.dtype == torch.float32:
        return cpu_ops.argmax_prob(x)
    i = int(torch.argmax(x))
    return i, float(torch.softmax(x.float(), -1)[i])


def all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no NaN and no infinity (the logits check before sampling): native on the
    CPU path (one pass; torch's isfinite().all() builds a bool tensor first)."""
    if _NATIVE and not x.is_cuda and x.dtype == torch.float32:
        return cpu_ops.all_finite(x)
    return bool(torch.isfinite(x).all())


def embed_site(weight: QTensor, scale: float | None = None):
    """The embedding lookup of `weight`: a callable tokens [T] -> fp32 [T, n_embd] (rows times
    `scale`, Gemma's sqrt(n_embd)). Native on the CPU path: one call decodes the rows from the
    GGUF blocks, with everything but the tokens bound once (the torch decode is a dozen small
    ops, each slow on the caches a streamed weight matrix just evicted: ~0.2 ms per lookup in a
    decode step); the same fp32 values as the torch one."""
    raw = weight.raw
    if (
        _NATIVE
        and not raw.is_cuda
        and raw.dtype == torch.uint8
        and raw.dim() == 2
        and raw.stride(1) == 1
        and weight.qtype in cpu_native.SUPPORTED_TYPES
        and scale != 0.0
    ):
        return cpu_ops.EmbedRows(raw, weight.qtype, weight.shape[-1], scale or 0.0)

    def lookup(tokens: torch.Tensor) -> torch.Tensor:
        x = weight.rows(tokens.to(raw.device))
        return x * scale if scale is not None else x

    return lookup


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2F] (gate | up) -> act(gate) * up; act "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if gate_up.is_cuda:
        from llmkit.kernels.triton_fused import glu as fused

        return fused(gate_up, act)
    if _NATIVE and not gate_up.requires_grad:
        return cpu_ops.glu(gate_up, act)
    return torch_ops.glu(gate_up, act)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int, norm=None,
         scale: float = 1.0, inplace: bool = False) -> torch.Tensor:  # fmt: skip
    """x [T, H, D]: the per-head RMSNorm `norm` (weight, eps) first when given, then rotate the
    first 2 * cos.shape[-1] dims (NORM: adjacent pairs, NEOX: halves), then times `scale`.
    NORM stays on torch on a GPU: its 2 kernels measured faster than the Triton launch in a
    graph-replayed step (1.83 against 1.92 ms per step of a 1.1B llama on an H100).
    `inplace`: x is the caller's scratch, which the native path may rotate in place (use the
    result, not x)."""
    if _NATIVE and not x.is_cuda and not x.requires_grad:
        return cpu_ops.rope(x, cos, sin, mode, norm, scale, inplace)
    if norm is not None:
        x = rms_norm(x, *norm)
    if x.is_cuda and mode == ROPE_NEOX:
        from llmkit.kernels.triton_rope import rope as triton_rope

        y = triton_rope(x, cos, sin, mode)
    else:
        y = torch_ops.rope(x, cos, sin, mode)
    return y * scale if scale != 1.0 else y


# -- attention ----------------------------------------------------------------------------------------


def attention_kernel(family: str) -> str:
    """The attention implementation of a kernel family: the Triton kernel for "triton" (on a GPU,
    or under TRITON_INTERPRET=1 in tests), the native kernel for "cpu", SDPA for "torch"."""
    return {"triton": "triton", "cpu": "native"}.get(family, "torch")


def kv_attention_kernel(kernel: str, type_k: str, type_v: str) -> str:
    """The rule for KV cache types the native and Triton kernels do not read: turbo3 / turbo4
    (rotated codes, core/cache/turbo.py) always take the torch path, whatever the device."""
    if type_k.startswith("turbo") or type_v.startswith("turbo"):
        return "torch"
    return kernel


def check_attention_kernel(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise LlmkitError(
            f"unknown attention kernel {kernel!r} (use {', '.join(ATTENTION_KERNELS)})"
        )


def supports_tree_masks(kernel: str) -> bool:
    """Draft-tree batches need an arbitrary [T, S] mask (siblings share a position): the torch
    and native paths take one; the Triton kernel masks by slot position."""
    return kernel in ("torch", "native")


def supports_graph_capture(kernel: str) -> bool:
    """CUDA-graph replay needs attention that masks by slot position with no host reads."""
    return kernel == "triton"


def attention_torch(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA over a [T, S] mask (the torch row of the table)."""
    return torch_ops.attention(q, k, v, mask, scale)


kv_store_native = cpu_ops.kv_store  # rows into cache slots, converted or quantized on write
layer_attention = cpu_ops.LayerAttention  # one layer's write + attend, bound to its buffers
mask_bytes = cpu_ops.mask_bytes  # a [T, S] bool mask as the native kernels' bytes (a view)
BlockShape = cpu_block.BlockShape
StepGroup = native_abi.StepGroup  # a step's attention inputs for one cache group (native_stack)


def block_site(m: int, linears: tuple, norms: tuple, eps: float, glu: str, shape: BlockShape):
    """A pre-norm block (q|k|v, output, gate|up and down linears; norms (attn, post-attn or
    None, ffn, post-ffn or None)) in one native call per step of up to m rows
    (cpu_block.BlockSite), or None off the native CPU path. A caller pairs it with its cache's
    `native_step(il)`."""
    if not _NATIVE or any(type(w) is not cpu_native.NativeLinear for w in linears):
        return None
    act = native_abi.native_glu(glu)  # as linear_site: llama.cpp's GELU table
    return cpu_block.BlockSite(m, linears, norms, eps, act, shape)


def stack_site(sites: list, rope_index: list[int]):
    """Block sites (block_site, all for the same m) run in turn by one native call
    (cpu_block.StackSite), block l with RoPE table rope_index[l]; None if a block has none."""
    if not sites or any(s is None for s in sites):
        return None
    return cpu_block.StackSite(sites, rope_index)


def nextn_site(block, embed, norms: tuple, eps: float, eh_proj, head, head_norm):
    """A NextN head's draft step (embedding, input norms, eh_proj, its block: a block_site, and
    the draft head with its norm `head_norm`) in one native call (cpu_block.NextNSite), or None
    when a part is off the native CPU path."""
    if not isinstance(embed, cpu_ops.EmbedRows) or any(
        type(w) is not cpu_native.NativeLinear for w in (eh_proj, head)
    ):
        return None
    return cpu_block.NextNSite(block, embed, norms, eps, eh_proj, head, head_norm)


def attention_native(q, k, k_kind, v, v_kind, dv: int, n_read: int, kpos, qpos, scale: float,
                     window, mask=None, slot_idx=None) -> torch.Tensor:  # fmt: skip
    """The native kernel over the cache as stored: k/v [Hkv, cap, row] of their element types,
    V rows of dv values; visible by position, or by an explicit mask (draft trees, paged)."""
    return cpu_ops.attention(q, k, k_kind, v, v_kind, dv, n_read, kpos, qpos, scale, window,
                             mask, slot_idx)  # fmt: skip


def attention_triton(q, k, v, kpos, qpos, scale: float, window, k_type=None, v_type=None):
    """The Triton kernel over the cache as stored (f16, or q8_0 / q4_0 blocks named by type)."""
    from llmkit.kernels.triton_attention import attention as triton_attention

    return triton_attention(q, k, v, kpos, qpos, scale, window, k_type=k_type, v_type=v_type)
