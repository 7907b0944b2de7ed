"""`llm quantize` end to end on tiny models: output loads and runs, metadata, MTP tensors, errors."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from cli_run import llm
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.gguf.writer import RawTensor, encode_tensor
from llmkit.core.models.loader import load_model
from tiny_models import write_tiny_llama
from tiny_step35 import write_tiny_step35


def _to_f16(md, tensors):
    for name, t in tensors.items():
        if isinstance(t, RawTensor):
            x = t.data if t.qtype in (QT.F32, QT.F16) else gq.dequantize(t.data, t.qtype)
            tensors[name] = encode_tensor(np.asarray(x, np.float32).reshape(t.shape), QT.F16)
    md["general.file_type"] = 1


@pytest.fixture(scope="module")
def f16_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("q") / "f16.gguf", edit=_to_f16)


@pytest.mark.parametrize("qtype,ftype", [("Q4_K_M", 15), ("Q8_0", 7), ("IQ4_NL", 25)])
def test_quantize_loads_and_runs(f16_llama, tmp_path, monkeypatch, capsys, qtype, ftype):
    out = tmp_path / "out.gguf"
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", f16_llama, out, qtype, "--verbose")
    assert rc == 0, err
    assert "quant size" in err and "blk.0.ffn_down.weight" in err
    gf = GGUFFile(out)
    assert gf.metadata["general.file_type"] == ftype
    assert gf.metadata["general.quantization_version"] == 2
    assert gf.tensors["blk.0.attn_norm.weight"].type_name == "F32"
    ref = load_model(f16_llama, kernels="torch")
    lm = load_model(out, kernels="torch")
    toks = torch.tensor([1, 260, 261, 262, 263])
    with torch.inference_mode():
        a = ref.model.forward(toks, ref.new_cache(32), logits="all").logits
        b = lm.model.forward(toks, lm.new_cache(32), logits="all").logits
    assert torch.isfinite(b).all()
    assert torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1] > 0.9


def test_mtp_tensors_quantized(tmp_path, monkeypatch, capsys):
    src = write_tiny_step35(tmp_path / "s35.gguf", seed=4, layout="full")
    out = tmp_path / "s35_q.gguf"
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", src, out, "Q4_0", "--allow-requantize",
                  "--keep-mtp-type", "Q8_0")  # fmt: skip
    assert rc == 0, err
    gf = GGUFFile(out)
    assert gf.tensors["blk.4.nextn.eh_proj.weight"].type_name == "Q8_0"
    assert gf.tensors["blk.5.attn_q.weight"].type_name == "Q8_0"
    assert gf.tensors["blk.1.attn_q.weight"].type_name == "Q4_0"
    assert gf.tensors["blk.4.nextn.enorm.weight"].type_name == "F32"
    lm = load_model(out, mtp=True, kernels="torch")
    assert lm is not None


def test_requantize_needs_flag(tmp_path, monkeypatch, capsys):
    src = write_tiny_llama(tmp_path / "q.gguf")  # Q8_0/Q4_0/... weights
    out = tmp_path / "o.gguf"
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", src, out, "Q4_0")
    assert rc == 1 and "--allow-requantize" in err and not out.exists()


def test_bad_inputs(f16_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.gguf"
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", f16_llama, out, "Q7_K")
    assert rc == 1 and "Q4_K_M" in err and len(err.strip().splitlines()) == 1
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", f16_llama, f16_llama, "Q8_0")
    assert rc == 1 and "input" in err
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", tmp_path / "missing.gguf", out, "Q8_0")
    assert rc == 1 and "not found" in err
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(f16_llama.read_bytes()[:-1000])
    rc, _stdout, err = llm(capsys, monkeypatch, "quantize", trunc, out, "Q8_0")
    assert rc == 1 and "truncated" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.gguf")]
