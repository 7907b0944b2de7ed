"""The C-timed matmul calls (kernels/cpu_timing.py): one time per call, one shape and type."""

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native as cn
from llmkit.kernels import cpu_timing
from llmkit.quant.quantize import quantize

pytestmark = pytest.mark.skipif(
    not cn.available(), reason=f"no native lib: {cn.unavailable_reason()}"
)


def _weights(qtype, n, k, seed=0):
    return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05, qtype)


def _x(m, k):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(1))


def test_time_matmuls_times_each_call_in_c():
    k = 512
    lins = [cn.NativeLinear([(_weights(QT.Q4_K, 24, k, seed=s), QT.Q4_K, (24, k))]) for s in (1, 2)]
    times = cpu_timing.time_matmuls(lins, _x(3, k), 7)
    assert len(times) == 7 and all(0 < t < 1 for t in times)
    other = cn.NativeLinear([(_weights(QT.Q8_0, 24, k), QT.Q8_0, (24, k))])
    with pytest.raises(LlmkitError, match="one shape and type"):
        cpu_timing.time_matmuls([lins[0], other], _x(1, k), 1)
