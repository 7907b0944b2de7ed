"""Native quantizers (kernels/native/quantize_k.c, quantize_legacy.c) vs the torch reference
(quant/quantize.py, quant/kquants.py, quant/iquants.py): byte-identical blocks for every K-quant and
IQ4 type, with and without an importance matrix, and for the legacy Q4_0..Q8_0 types without one,
on irregular tensors, llama.cpp's frozen references and real weight blocks; bytes independent of
the thread count."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native
from llmkit.quant import native as quant_native
from llmkit.quant.quantize import quantize

DATA = Path(__file__).parent / "data"
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]

pytestmark = pytest.mark.skipif(not quant_native.available(), reason="native library not built")


def _irregular(rng: np.random.Generator, rows: int = 24, cols: int = 768) -> torch.Tensor:
    """Rows of different scales and shapes, plus the corner cases the searches branch on."""
    x = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-12, 4, (rows, 1)))
    x[0] = 0.0  # all-zero super-blocks
    x[1, :256] = 0.75  # constant super-block
    x[1, 256:512] = -2.0
    x[2] = np.abs(x[2])  # one-signed rows
    x[3] = -np.abs(x[3])
    x[4, ::37] *= 1e3  # outliers
    x[5] = rng.integers(-3, 4, cols)  # values on a coarse grid: ties and exact levels
    x[6, :64] = 1e-20  # near GROUP_MAX_EPS
    x[7] = rng.laplace(size=cols)
    x[8] = x[8].astype(np.float16)  # f16 weights, like a converted model
    x[9, ::2] = 0.0  # sparse
    x[10, :16] = 0.0  # one empty 16-value sub-block
    x[11] = rng.standard_normal(cols) * 60000.0  # near fp16's range
    return torch.from_numpy(x.astype(np.float32))


def _imatrix(rng: np.random.Generator, cols: int) -> torch.Tensor:
    w = rng.gamma(0.5, 2.0, cols)
    w[::11] = 0.0  # unused columns
    w[5::97] = 1e4
    return torch.from_numpy(w.astype(np.float32))


def _assert_same(ours: np.ndarray, ref: np.ndarray, ts: int, what: str) -> None:
    assert ours.shape == ref.shape, what
    bad = np.nonzero((ours.reshape(-1, ts) != ref.reshape(-1, ts)).any(1))[0]
    assert bad.size == 0, f"{what}: {bad.size} of {ref.size // ts} blocks differ: {bad[:8]}"


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_native_matches_torch(name, weighted):
    qt = QT[name]
    ts = GGML_QUANT_SIZES[qt][1]
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        x = _irregular(rng)
        im = _imatrix(rng, x.shape[1]) if weighted else None
        ref = quantize(x, qt, im, native=False).numpy()
        ours = quantize(x, qt, im).numpy()
        _assert_same(ours, ref, ts, f"{name} seed {seed}")


def _irregular_32(rng: np.random.Generator) -> torch.Tensor:
    """_irregular plus the 32-value blocks the legacy quantizers branch on: signed zeros, ties of
    the largest magnitude, one huge value, values whose codes land on the clamps."""
    x = _irregular(rng, rows=32).numpy().copy()
    x[12, :32] = -0.0  # a block of negative zeros (ggml's d = 0.0f / -8 = -0.0)
    x[12, 32:64] = np.tile([-0.0, 0.0], 16)
    x[12, 64:96] = np.tile([0.0, -0.0], 16)
    x[13, :32] = np.tile([3.0, -3.0], 16)  # |max| ties: the first one wins
    x[13, 32:64] = np.tile([-3.0, 3.0], 16)
    x[14, ::32] = 1e30  # one huge value per block
    x[15, ::32] = -1e35
    x[16] = rng.standard_normal(x.shape[1]) * 1e37  # d near float's range
    x[17] = rng.uniform(-1, 1, x.shape[1]).astype(np.float16).astype(np.float32) * 70000.0
    # (x[17]: d overflows fp16)
    x[18, :32] = np.arange(32) - 8.0  # exact levels
    x[19, :32] = (np.arange(32) - 16.0) / 16.0 + 1.0 / 32.0  # halfway points
    x[20, :32] = 5.0  # constant block: max == min
    x[21, :32] = np.float32(1e-30)  # tiny, d still normal
    return torch.from_numpy(x)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_native_matches_torch(name):
    qt = QT[name]
    ts = GGML_QUANT_SIZES[qt][1]
    for seed in (0, 1, 2):
        x = _irregular_32(np.random.default_rng(seed))
        ref = quantize(x, qt, native=False).numpy()
        _assert_same(quantize_native(x, qt), ref, ts, f"{name} seed {seed}")
        _assert_same(quantize(x, qt).numpy(), ref, ts, f"{name} seed {seed} via quantize()")


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_imatrix(name):
    """Q8_0 ignores an imatrix (native); the weighted Q4_0..Q5_1 searches stay in torch."""
    qt = QT[name]
    rng = np.random.default_rng(4)
    x = _irregular(rng)
    im = _imatrix(rng, x.shape[1])
    out = quant_native.quantize(x, qt, im)
    if qt == QT.Q8_0:
        assert np.array_equal(out.numpy(), quantize(x, qt, native=False).numpy())
    else:
        assert out is None
    ref = quantize(x, qt, im, native=False).numpy()
    assert np.array_equal(quantize(x, qt, im).numpy(), ref)


def test_legacy_zero_block_scale():
    """ggml's Q4_0/Q5_0 start from max = 0.0f: a block of (signed) zeros stores d = -0.0."""
    x = torch.tensor([[-0.0] * 32 + [0.0] * 32])
    for qt in (QT.Q4_0, QT.Q5_0):
        ts = GGML_QUANT_SIZES[qt][1]
        for native in (True, False):
            out = quantize(x, qt, native=native).numpy().reshape(2, ts)
            assert (out[:, :2] == [0x00, 0x80]).all(), (qt.name, native)


@pytest.mark.parametrize("name", TYPES + LEGACY)
def test_native_matches_llama_cpp_refs(name):
    """The frozen llama.cpp bytes of tests/data/quant_refs.npz (scripts/make_quant_refs.py)."""
    refs = np.load(DATA / "quant_refs.npz")
    qt = QT[name]
    ts = GGML_QUANT_SIZES[qt][1]
    for key in refs.files:
        if key.startswith("in/"):
            x = torch.from_numpy(refs[key])
            _assert_same(quantize_native(x, qt), refs[f"{name}/{key[3:]}"], ts, key)


@pytest.mark.parametrize("name", TYPES)
def test_native_real_blocks(name):
    """SmolLM2 super-blocks whose searches compare errors equal to rounding noise: llama.cpp's
    bytes where frozen (Q2_K, Q4_K, Q5_K), and the torch reference with and without imatrix."""
    data = np.load(DATA / "q4k_real_blocks.npz")
    x = torch.from_numpy(data["x"].astype(np.float32))
    qt = QT[name]
    ts = GGML_QUANT_SIZES[qt][1]
    if name in data.files:
        _assert_same(quantize_native(x, qt).reshape(data[name].shape), data[name], ts, "llama.cpp")
    im = _imatrix(np.random.default_rng(7), x.shape[1])
    for w in (None, im):
        ref = quantize(x, qt, w, native=False).numpy()
        _assert_same(quantize(x, qt, w).numpy(), ref, ts, f"imatrix={w is not None}")


def quantize_native(x: torch.Tensor, qt: QT, im: torch.Tensor | None = None) -> np.ndarray:
    out = quant_native.quantize(x, qt, im)
    assert out is not None
    return out.numpy()


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "IQ4_NL", "Q4_1", "Q8_0"])
def test_thread_count_does_not_change_bytes(name):
    qt = QT[name]
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((64, 2048)).astype(np.float32))
    im = None if qt == QT.Q4_1 else _imatrix(rng, 2048)
    prev = cpu_native.get_threads()
    try:
        outs = []
        for n in (1, 2, 3, 5):
            cpu_native.set_threads(n)
            outs.append((quantize_native(x, qt), quantize_native(x, qt, im)))
    finally:
        cpu_native.set_threads(prev)
    for a, b in outs[1:]:
        assert np.array_equal(a, outs[0][0]) and np.array_equal(b, outs[0][1])
    # a row alone gives the same bytes as inside the batch
    assert np.array_equal(quantize_native(x[5:6], qt, im), outs[0][1][5:6])


def test_shapes_fallback_and_errors():
    x = torch.randn(2, 3, 512)
    out = quant_native.quantize(x, QT.Q4_K)
    assert out.shape == (2, 3, 2 * 144) and out.dtype == torch.uint8
    assert np.array_equal(out.numpy(), quantize(x, QT.Q4_K, native=False).numpy())
    assert quant_native.quantize(x, QT.F16) is None  # not native: quantize() uses torch
    assert quant_native.quantize(x, QT.Q4_0, torch.ones(512)) is None  # weighted: torch
    assert quant_native.quantize(torch.zeros(0, 256), QT.Q6_K).shape == (0, 210)
    with pytest.raises(LlmkitError):
        quant_native.quantize(torch.randn(2, 100), QT.Q4_K)
    with pytest.raises(LlmkitError):
        quant_native.quantize(torch.randn(2, 256), QT.Q4_K, torch.ones(128))
