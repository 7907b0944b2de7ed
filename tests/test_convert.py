"""`llm convert`: tiny transformers checkpoints -> GGUF -> our forward equals transformers' forward."""

import sys

import pytest
import torch

from hf_checkpoints import write_hf_gemma3, write_hf_llama
from llmkit.cli.app import main
from llmkit.core.convert.hf import convert
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError

pytest.importorskip("transformers")

IDS = [0, 57, 23, 120, 5, 88, 201, 14, 99, 150, 7, 33, 260, 12, 18, 75]


def _rel_rms(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _ours(path, n):
    lm = load_model(path, kernels="torch")
    with torch.inference_mode():
        return lm.model.forward(
            torch.tensor(IDS[:n]), lm.new_cache(64, 64, "f32", "f32"), logits="all"
        ).logits


@pytest.mark.parametrize(
    "writer, tied", [(write_hf_llama, False), (write_hf_llama, True), (write_hf_gemma3, None)]
)
def test_round_trip_matches_transformers(tmp_path, writer, tied):
    hf = writer(tmp_path / "hf", tied=tied) if tied is not None else writer(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    convert(tmp_path / "hf", out, "f32")
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float()
    got = _ours(out, len(IDS))
    assert _rel_rms(got, ref) < 1e-4


def test_tokenizer_and_metadata(tmp_path):
    write_hf_llama(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    convert(tmp_path / "hf", out, "f16")
    md = GGUFFile(out).metadata
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.bos_token_id"] == 0 and md["tokenizer.ggml.add_bos_token"] is True
    assert md["general.file_type"] == 1 and "tokenizer.chat_template" in md
    from tokenizers import Tokenizer

    from llmkit.core.tokenizer import load_tokenizer

    ref = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    text = "The river that runs through the old town, 1,200 people!"
    assert load_tokenizer(md).encode(text, add_special=False) == ref.encode(text).ids


def test_q8_0_and_bf16_outtypes(tmp_path):
    write_hf_gemma3(tmp_path / "hf")
    for outtype, qt in (("q8_0", "Q8_0"), ("bf16", "BF16")):
        out = tmp_path / f"{outtype}.gguf"
        convert(tmp_path / "hf", out, outtype)
        g = GGUFFile(out)
        assert g.tensors["blk.0.attn_q.weight"].type_name == qt
        assert g.tensors["blk.0.attn_norm.weight"].type_name == "F32"
        load_model(out)


def test_bad_input(tmp_path, capsys, monkeypatch):
    write_hf_llama(tmp_path / "hf")
    with pytest.raises(LlmkitError, match="no config.json"):
        convert(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(LlmkitError, match="unknown --outtype"):
        convert(tmp_path / "hf", tmp_path / "x.gguf", "q3")
    with pytest.raises(LlmkitError, match="is a directory"):
        convert(tmp_path / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "gone.safetensors")
    with pytest.raises(LlmkitError, match="no \\*.safetensors"):
        convert(tmp_path / "hf", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "llm",
            "convert",
            str(tmp_path / "hf"),
            "-o",
            str(tmp_path / "y.gguf"),
            "--no-mtp",
            "--mtp-only",
        ],
    )
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1 and "exclude each other" in capsys.readouterr().err


def test_step35_mtp_layers_kept_dropped_and_sidecar(tmp_path):
    from hf_checkpoints import write_hf_step35
    from llmkit.core.decode.drafter import MTPDrafter
    from llmkit.core.decode.loop import Speculation, generate
    from llmkit.core.decode.sampling import Sampler, SamplerParams
    from llmkit.core.decode.speculative import SpecConfig, SpecStats
    from llmkit.quant.dequant import dequantize
    from tiny_step35 import write_tiny_step35

    ref = write_tiny_step35(tmp_path / "ref.gguf", seed=4, layout="full", draft_noise=0.2)
    write_hf_step35(tmp_path / "hf", ref)
    full, trunk, side = tmp_path / "full.gguf", tmp_path / "trunk.gguf", tmp_path / "mtp.gguf"
    convert(tmp_path / "hf", full, "f32")
    convert(tmp_path / "hf", trunk, "f32", "drop")
    convert(tmp_path / "hf", side, "f32", "only")
    g, r = GGUFFile(full), GGUFFile(ref)
    assert g.metadata["step35.nextn_predict_layers"] == 3 and g.metadata["step35.block_count"] == 7
    assert set(g.tensors) == set(r.tensors) - {"rope_freqs.weight"}
    for name, info in g.tensors.items():  # every tensor, NextN ones included, survives exactly
        ri = r.tensors[name]
        a = dequantize(torch.from_numpy(g.raw(name)), info.qtype, info.shape)
        b = dequantize(torch.from_numpy(r.raw(name)), ri.qtype, ri.shape)
        assert torch.allclose(a, b, rtol=0, atol=2e-7), name
    t = GGUFFile(trunk)
    assert "step35.nextn_predict_layers" not in t.metadata and t.metadata["step35.block_count"] == 4
    assert not any(
        ".nextn." in n or n.startswith(("blk.4.", "blk.5.", "blk.6.")) for n in t.tensors
    )
    s = GGUFFile(side)
    assert {n.split(".")[1] for n in s.tensors if n.startswith("blk.")} == {"4", "5", "6"}

    def run(lm):
        spec = SpecStats(3)
        mtp = Speculation(MTPDrafter(lm.model.mtp, 128, 16), SpecConfig(3), spec)
        greedy = Sampler(SamplerParams(temp=0))
        out = list(
            generate(lm.model, lm.new_cache(128, 16), [1, 5, 9, 40, 77], greedy, 30, spec=mtp)
        )
        return out, spec.accepted_per_position

    assert run(load_model(full, mtp=True)) == run(load_model(trunk, mtp=True, draft_path=side))
    assert load_model(trunk).config.n_nextn == 0


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import llmkit.core.convert.hf as conv

    write_hf_llama(tmp_path / "hf")
    calls = {"n": 0}
    real = conv._encode

    def failing(t, q):
        calls["n"] += 1
        if calls["n"] > 30:  # after the header and a few tensors: like a full disk
            raise OSError(28, "No space left on device")
        return real(t, q)

    monkeypatch.setattr(conv, "_encode", failing)
    with pytest.raises(OSError):
        convert(tmp_path / "hf", tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*out.gguf*"))
