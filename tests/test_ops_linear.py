"""The kernel table's matmuls (kernels/ops.py make_linear): regimes agree with fp32 math, GEMV-regime
rows (what keeps MTP verification lossless), fused weights split back exactly."""

import torch
from gguf import GGMLQuantizationType as QT

from llmkit.kernels.backend import GEMV_MAX_ROWS, Backend
from llmkit.kernels.ops import make_linear
from llmkit.quant.tensor import QTensor


def _qt(name, w):
    return QTensor(name, QT.F32, tuple(w.shape), w)


def test_regimes_match_fp32_reference():
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    lin = make_linear(Backend(weight_dtype=torch.bfloat16, kernels="torch"), _qt("w", w))
    for m in (1, 3, GEMV_MAX_ROWS, 40):
        x = torch.randn(m, 96)
        torch.testing.assert_close(lin(x), x @ w.T, rtol=3e-2, atol=0.15)


def test_gemv_regime_is_batch_invariant():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float32):
        lin = make_linear(Backend(weight_dtype=dtype, kernels="torch"), _qt("w", w))
        x = torch.randn(4, 128)
        rows = torch.cat([lin(x[i : i + 1]) for i in range(4)])
        if dtype == torch.bfloat16:
            assert torch.equal(lin(x), rows)
        else:  # fp32 BLAS may order the reduction differently for M > 1
            torch.testing.assert_close(lin(x), rows, rtol=1e-5, atol=1e-5)


def test_fused_weights_and_extra_bytes():
    a, b = torch.randn(8, 32), torch.randn(24, 32)
    be = Backend(weight_dtype=torch.float32, kernels="torch")
    lin = make_linear(be, _qt("a", a), _qt("b", b))
    x = torch.randn(2, 32)
    ya, yb = lin(x).split((8, 24), dim=-1)
    torch.testing.assert_close(ya, x @ a.T)
    torch.testing.assert_close(yb, x @ b.T)
    assert be.extra_bytes == (8 + 24) * 32 * 4
