"""Packed-int4 CPU kernel: the GGUF 4-bit types map onto (q - 8) * scale + zero exactly, the matmul
stays within bf16 tolerance of fp32 math on irregular shapes, and rows are batch-invariant."""

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.kernels import cpu_int4
from llmkit.kernels.backend import GEMV_MAX_ROWS, Backend
from llmkit.kernels.linear_torch import DenseLinear
from llmkit.kernels.ops import make_linear
from llmkit.quant.quantize import quantize
from llmkit.quant.tensor import QTensor

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="no packed int4 ops in torch")


def _qtensor(qtype, n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return QTensor(f"w{seed}", qtype, (n, k), quantize(w, qtype))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_groups_reproduce_the_dequantized_weights_exactly(qtype):
    qt = _qtensor(qtype, 48, 512, 1)
    q, scale, zero = cpu_int4.int4_groups(qt)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    w = (q.float() - 8).view(48, -1, 32) * scale[..., None] + zero[..., None]
    assert torch.equal(w.view(48, 512), qt.dequantize())


@pytest.mark.parametrize("qtype,n,k", [(QT.Q4_0, 80, 96), (QT.Q4_1, 48, 160), (QT.Q4_K, 32, 768)])
def test_matmul_close_to_fp32_and_batch_invariant(qtype, n, k):
    lin = cpu_int4.Int4Linear([_qtensor(qtype, n, k, 2)], max_rows=64)
    w = lin.dense()
    for m in (1, 3, GEMV_MAX_ROWS, 65):
        x = torch.randn(m, k)
        y = lin(x)
        ref = x @ w.T
        assert torch.isfinite(y).all()
        assert (y - ref).norm() / ref.norm() < 1e-2  # bf16 activations and scales
    x = torch.randn(GEMV_MAX_ROWS, k)
    rows = torch.cat([lin(x[i : i + 1]) for i in range(GEMV_MAX_ROWS)])
    assert torch.equal(lin(x), rows)
    big = torch.randn(70, k)  # GEMM regime: exact fp32 weights
    torch.testing.assert_close(lin(big), big @ w.T)


def test_dispatch_packs_4bit_fused_weights_and_falls_back_for_others():
    be = Backend(weight_dtype=torch.bfloat16)
    a, b = _qtensor(QT.Q4_1, 32, 64, 3), _qtensor(QT.Q4_0, 16, 64, 4)
    lin = make_linear(be, a, b)
    assert isinstance(lin, cpu_int4.Int4Linear) and lin.out_features == 48
    assert be.extra_bytes == lin.nbytes == 48 * 64 // 2 + 48 * 2 * 2 * 2
    x = torch.randn(2, 64)
    ya, yb = lin(x).split((32, 16), dim=-1)
    torch.testing.assert_close(ya, x @ a.dequantize().T, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(yb, x @ b.dequantize().T, rtol=2e-2, atol=2e-2)
    # fp32 mode keeps exact dense copies; a non-4-bit part or an odd N keeps the dense path
    assert isinstance(make_linear(Backend(weight_dtype=torch.float32), a), DenseLinear)
    assert isinstance(make_linear(be, a, _qtensor(QT.Q8_0, 16, 64, 5)), DenseLinear)
    assert isinstance(make_linear(be, _qtensor(QT.Q4_0, 24, 64, 6)), DenseLinear)
