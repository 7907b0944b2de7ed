"""Quantizers vs llama.cpp: byte-identical blocks on frozen references (scripts/make_quant_refs.py),
round-trip error bounds, importance-weighted paths, and llama.cpp's per-tensor type mixes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.core.gguf.imatrix import load_imatrix
from llmkit.errors import LlmkitError
from llmkit.quant.dequant import dequantize
from llmkit.quant.mix import ModelInfo, choose_types, parse_type
from llmkit.quant.quantize import quantize

DATA = Path(__file__).parent / "data"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS", "F16", "BF16"]  # fmt: skip
# relative RMS round-trip error bound on N(0, 1) rows
RMSE = {"Q4_0": 0.12, "Q4_1": 0.11, "Q5_0": 0.06, "Q5_1": 0.055, "Q8_0": 0.008, "Q2_K": 0.4,
        "Q3_K": 0.2, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025, "IQ4_NL": 0.1, "IQ4_XS": 0.1,
        "F16": 1e-3, "BF16": 5e-3}  # fmt: skip


@pytest.fixture(scope="module")
def refs():
    return np.load(DATA / "quant_refs.npz")


@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_llama_cpp(refs, name):
    qt = QT[name]
    ts = GGML_QUANT_SIZES[qt][1]
    n_blocks = 0
    for key in refs.files:
        if not key.startswith("in/"):
            continue
        tensor = key[3:]
        ours = quantize(torch.from_numpy(refs[key]), qt).numpy()
        ref = refs[f"{name}/{tensor}"]
        assert ours.shape == ref.shape, tensor
        bad = np.nonzero((ours.reshape(-1, ts) != ref.reshape(-1, ts)).any(1))[0]
        assert bad.size == 0, f"{tensor}: {bad.size} of {ref.size // ts} blocks differ"
        n_blocks += ref.size // ts
    assert n_blocks >= 60


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_real_weight_blocks_match_llama_cpp(name):
    """SmolLM2-135M super-blocks (f16 values) on which random data never trips: their sub-block
    searches compare errors that differ by rounding noise, so one ulp in `c / tensor` (torch's
    reciprocal-then-multiply) or in torch's float32 sqrt flipped a packed 6-bit scale or min.
    Bytes from llama.cpp's quantize_row_*_ref."""
    data = np.load(DATA / "q4k_real_blocks.npz")
    x = torch.from_numpy(data["x"].astype(np.float32))
    ref = data[name]
    ours = quantize(x, QT[name]).numpy().reshape(ref.shape)
    bad = np.nonzero((ours != ref).any(1))[0]
    assert bad.size == 0, f"{bad.size} of {len(ref)} blocks differ: {bad[:10]}"


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_error(name):
    qt = QT[name]
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((6, 512)).astype(np.float32))
    back = dequantize(quantize(x, qt), qt)
    rel = ((back - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert rel < RMSE[name], rel


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                  "Q6_K", "IQ4_NL", "IQ4_XS"])  # fmt: skip
def test_imatrix_weights_lower_the_weighted_error(name):
    """The weighted search trades error on unimportant columns for the important ones."""
    qt = QT[name]
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((4, 256)).astype(np.float32))
    imat = torch.from_numpy(np.where(np.arange(256) % 8 == 0, 50.0, 0.1).astype(np.float32))
    plain = dequantize(quantize(x, qt), qt)
    weighted = dequantize(quantize(x, qt, imatrix=imat), qt)

    def werr(y):
        return ((y - x).pow(2) * imat).sum().item()

    assert werr(weighted) < werr(plain) * 1.02
    rel = ((weighted - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert rel < 2.5 * RMSE[name]


def test_imatrix_dat_and_gguf(tmp_path):
    import struct

    from gguf import GGUFWriter

    dat = tmp_path / "m.dat"
    name = b"blk.0.ffn_down.weight"
    vals = np.arange(1, 5, dtype=np.float32) * 4
    dat.write_bytes(
        struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 4, 4) + vals.tobytes()
    )
    assert np.allclose(load_imatrix(dat)["blk.0.ffn_down.weight"], [1, 2, 3, 4])
    g = tmp_path / "m.gguf"
    w = GGUFWriter(str(g), "imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([[2, 4], [1, 1]], np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([[2], [0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert np.allclose(load_imatrix(g)["blk.0.attn_q.weight"], [1, 2, 1, 1])
    with pytest.raises(LlmkitError, match="not found"):
        load_imatrix(tmp_path / "nope.dat")


# hparams of the recorded models (SmolLM2-135M: 9 heads / 3 kv; Gemma 3 270M: 4 heads / 1 kv)
INFO = {"smollm2": ModelInfo("llama", 30, 3, 0), "gemma3": ModelInfo("gemma3", 18, 4, 0)}


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_mix_matches_llama_cpp(model):
    ref = json.loads((DATA / "quant_mix_refs.json").read_text())[model]
    tensors = {n: (tuple(s), QT.F32 if len(s) == 1 else QT.F16) for n, s in ref["shapes"].items()}
    for mix, types in ref["types"].items():
        got = {n: t.name for n, t in choose_types(tensors, mix, INFO[model]).items()}
        assert got == types, mix


def test_pure_and_fallback():
    tensors = {"blk.0.attn_v.weight": ((64, 256), QT.F16), "blk.0.ffn_down.weight": ((64, 96), QT.F16),
               "blk.0.attn_norm.weight": ((256,), QT.F32), "token_embd.weight": ((10, 256), QT.F16)}  # fmt: skip
    info = ModelInfo("llama", 1, 1, 0)
    pure = choose_types(tensors, "Q4_K_M", info, pure=True)
    assert pure["blk.0.attn_v.weight"] == QT.Q4_K and pure["token_embd.weight"] == QT.Q4_K
    assert pure["blk.0.ffn_down.weight"] == QT.Q5_0  # 96 % 256: Q4_K falls back
    assert pure["blk.0.attn_norm.weight"] == QT.F32
    mixed = choose_types(tensors, "Q4_K_M", info)
    assert mixed["blk.0.attn_v.weight"] == QT.Q6_K and mixed["token_embd.weight"] == QT.Q6_K
    assert mixed["blk.0.ffn_down.weight"] == QT.Q8_0  # Q6_K falls back to Q8_0
    with pytest.raises(LlmkitError, match="valid: Q4_0"):
        parse_type("Q7_K")
