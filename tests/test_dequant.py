"""Bit-identity of llmkit's torch dequantizers against gguf-py's numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.quant import dequant
from llmkit.quant.dequant import SUPPORTED_TYPES, dequantize, row_bytes, row_elems

ALL_TYPES = [
    QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS,
]  # fmt: skip

# Types gguf-py can quantize (the rest only have a reference dequantizer).
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]

# Byte offsets of the fp16 scale fields in each block: random bytes there are often NaN/Inf,
# which would hide every other field's bits, so tests overwrite them with finite values.
FP16_FIELDS = {
    QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
    QT.IQ4_NL: [0], QT.IQ4_XS: [0],
}  # fmt: skip


def _random_rows(qtype: QT, n_rows: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes [n_rows, row_bytes] with sane (finite, varied) fp16 scales."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, []):
        # Mix magnitudes, including fp16 subnormals, and both signs.
        exponent = rng.integers(-7, 2, size=(n_rows, n_blocks))
        scale = rng.uniform(-1, 1, size=(n_rows, n_blocks)) * 10.0**exponent
        raw[:, :, off : off + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n_rows, n_blocks * type_size)


def _reference(raw: np.ndarray, qtype: QT) -> torch.Tensor:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales are tested on purpose
        ref = quants.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(ref, np.float32))


def _assert_bit_identical(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    # Compare bit patterns so that -0.0 vs 0.0 counts as a difference.
    assert torch.equal(got[~nan].view(torch.int32), ref[~nan].view(torch.int32))


def test_supported_types():
    assert SUPPORTED_TYPES == frozenset(ALL_TYPES)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_bytes_bit_identical(qtype):
    raw = _random_rows(qtype, n_rows=7, n_blocks=3, seed=qtype.value)
    got = dequantize(torch.from_numpy(raw), qtype)
    _assert_bit_identical(got, _reference(raw, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_raw_random_bytes_nan_scales(qtype):
    # Untouched random bytes: some scales are NaN/Inf, which must propagate the same way.
    raw = np.random.default_rng(qtype.value).integers(0, 256, size=(64, row_bytes(qtype, 256)))
    raw = raw.astype(np.uint8)
    got = dequantize(torch.from_numpy(raw), qtype)
    _assert_bit_identical(got, _reference(raw, qtype))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_data_bit_identical(qtype):
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(qtype.value)
    n = 2 * max(block_size, 32)
    data = (rng.standard_normal((5, n)) * rng.uniform(0.01, 3.0, size=(5, 1))).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block exercises d == 0
    raw = np.ascontiguousarray(quants.quantize(data, qtype)).view(np.uint8)
    assert raw.shape[1] == row_bytes(qtype, n)
    got = dequantize(torch.from_numpy(raw), qtype)
    _assert_bit_identical(got, _reference(raw, qtype))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_float_tensor_input(qtype):
    x = torch.randn(5, 64).to(
        {QT.F32: torch.float32, QT.F16: torch.float16}.get(qtype, torch.bfloat16)
    )
    got = dequantize(x, qtype)
    assert torch.equal(got, x.to(torch.float32))
    assert torch.equal(dequantize(x.view(torch.uint8), qtype), got)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q8_0, QT.BF16], ids=lambda t: t.name)
def test_leading_dims_row_selection_and_dtype(qtype):
    raw = _random_rows(qtype, n_rows=6, n_blocks=2, seed=1)
    ref = _reference(raw, qtype)  # [6, row_elems]
    t = torch.from_numpy(raw)

    got = dequantize(t.view(2, 3, -1), qtype)
    assert got.shape == (2, 3, ref.shape[1])
    _assert_bit_identical(got.reshape(6, -1), ref)

    # Embedding-style lookup: only the selected rows are decoded.
    ids = torch.tensor([[4, 0], [4, 5]])
    _assert_bit_identical(dequantize(t[ids], qtype), ref[ids])

    got = dequantize(t, qtype, shape=(3, 2 * ref.shape[1]), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref.reshape(3, -1).to(torch.bfloat16))


def test_misaligned_and_strided_input():
    qtype = QT.Q6_K
    raw = _random_rows(qtype, n_rows=3, n_blocks=2, seed=2)
    ref = _reference(raw, qtype)
    rb = raw.shape[1]
    # Rows starting at an odd byte address, as a slice of a larger mapped buffer would.
    buf = torch.zeros(1 + raw.size, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw).reshape(-1)
    _assert_bit_identical(dequantize(buf[1:].view(3, rb), qtype), ref)
    # Every other row of a wider buffer: not contiguous.
    wide = torch.zeros(6, rb, dtype=torch.uint8)
    wide[::2] = torch.from_numpy(raw)
    _assert_bit_identical(dequantize(wide[::2], qtype), ref)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q5_K, QT.IQ4_XS], ids=lambda t: t.name)
def test_chunked_path(qtype, monkeypatch):
    # Force several chunks (including a short last one) on a small input.
    monkeypatch.setattr(dequant, "_CHUNK_ELEMS", 512)
    raw = _random_rows(qtype, n_rows=5, n_blocks=3, seed=3)
    ref = _reference(raw, qtype)
    _assert_bit_identical(dequantize(torch.from_numpy(raw), qtype), ref)
    got = dequantize(torch.from_numpy(raw), qtype, dtype=torch.float16)
    assert torch.equal(got, ref.to(torch.float16))


def test_empty_input():
    got = dequantize(torch.empty(0, 144, dtype=torch.uint8), QT.Q4_K)
    assert got.shape == (0, 256)


@pytest.mark.parametrize("qtype", [QT.Q8_K, QT.IQ2_XXS, QT.TQ1_0, QT.MXFP4], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype):
    _, type_size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(LlmkitError, match=qtype.name):
        dequantize(torch.zeros(2, type_size, dtype=torch.uint8), qtype)


def test_bad_input_raises():
    with pytest.raises(LlmkitError, match="Q4_0"):
        dequantize(torch.zeros(2, 19, dtype=torch.uint8), QT.Q4_0)  # not whole blocks
    with pytest.raises(LlmkitError, match="uint8"):
        dequantize(torch.zeros(2, 18, dtype=torch.float32), QT.Q4_0)
    with pytest.raises(LlmkitError, match="shape"):
        dequantize(torch.zeros(2, 18, dtype=torch.uint8), QT.Q4_0, shape=(3, 32))


def test_row_sizes():
    assert row_bytes(QT.Q4_K, 640 * 4) == 10 * 144
    assert row_elems(QT.Q4_K, 10 * 144) == 2560
    assert row_bytes(QT.Q8_0, 640) == 20 * 34
    assert row_elems(QT.F16, 10) == 5
    assert row_bytes(QT.BF16, 3) == 6
    for qtype in ALL_TYPES:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert row_elems(qtype, row_bytes(qtype, 3 * block_size)) == 3 * block_size
    with pytest.raises(LlmkitError, match="Q4_K"):
        row_bytes(QT.Q4_K, 100)
    with pytest.raises(LlmkitError, match="Q8_0"):
        row_elems(QT.Q8_0, 33)
