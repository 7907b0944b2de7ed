"""torch block quantizers are byte-identical to gguf-py's reference port of ggml."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from llmkit.errors import LlmkitError
from llmkit.quant.dequant import dequantize
from llmkit.quant.quantize import quantize


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0])
def test_bytes_match_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 30, (7, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 1e-8  # tiny values
    x[2, :32] = np.linspace(-4, 4, 32)  # exact .5 boundaries after scaling
    ours = quantize(torch.from_numpy(x), qtype).numpy()
    ref = gq.quantize(x, qtype)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    back = dequantize(torch.from_numpy(ours), qtype).numpy()
    assert np.array_equal(back, gq.dequantize(ref, qtype))


def test_leading_dims_and_errors():
    x = torch.randn(2, 3, 64)
    assert quantize(x, QT.Q8_0).shape == (2, 3, 68)
    with pytest.raises(LlmkitError, match="multiple of 32"):
        quantize(torch.randn(3, 40), QT.Q8_0)
    with pytest.raises(LlmkitError, match="no quantizer for IQ2_XXS"):
        quantize(x, QT.IQ2_XXS)
