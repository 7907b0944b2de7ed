"""Gemma 4 MoE (26B-A4B layout): tiny random transformers checkpoints with `enable_moe_block`
-> `llm convert` -> llmkit, against transformers fp32 (router scale, per-expert scales and all
five FFN norms randomised so each is seen)."""

from __future__ import annotations

import json

import pytest
import torch
from test_gemma4 import IDS, _rel_rms, convert_cli, hf_greedy, ours_greedy, write_hf_gemma4

from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError

pytest.importorskip("transformers")

MOE = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)


def write_hf_moe(d, **kw):
    model = write_hf_gemma4(d, **(MOE | kw))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("router.scale", "router.per_expert_scale")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    model.save_pretrained(d)
    return model


@pytest.mark.parametrize(
    "kw",
    [{}, dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False)],
    ids=["moe-ple-shared", "moe-plain"],
)
def test_moe_logits_and_greedy_match_transformers(tmp_path, monkeypatch, kw):
    hf = write_hf_moe(tmp_path / "hf", **kw)
    out = tmp_path / "m.gguf"
    convert_cli(tmp_path / "hf", out, monkeypatch)
    gf = GGUFFile(out)
    md = gf.metadata
    assert (md["gemma4.expert_count"], md["gemma4.expert_used_count"]) == (8, 2)
    assert md["gemma4.expert_feed_forward_length"] == 24
    assert list(gf.tensors["blk.1.ffn_gate_up_exps.weight"].shape) == [8, 48, 64]
    assert list(gf.tensors["blk.1.ffn_down_exps.scale"].shape) == [8]
    assert list(gf.tensors["blk.1.ffn_gate_inp.scale"].shape) == [64]
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float()
    # torch: the fp32 reference ops; cpu: llama.cpp's arithmetic (fp16 GELU table)
    for kernels, tol in (("torch", 1e-4), ("cpu", 2e-2)):
        lm = load_model(out, kernels=kernels)
        assert lm.model.supports_cuda_graphs is False
        cache = lm.new_cache(64, 32, "f32", "f32")
        with torch.inference_mode():
            got = lm.model.forward(torch.tensor(IDS), cache, logits="all").logits
        rms = _rel_rms(got, ref)
        print(f"{kw} {kernels}: all-position logits rel RMS {rms:.2e}")
        assert rms < tol
    n = 24
    want = hf_greedy(hf, IDS[:6], n)
    for kernels in ("torch", "cpu"):
        assert ours_greedy(load_model(out, kernels=kernels), IDS[:6], n) == want, kernels


def test_moe_routing_matters(tmp_path, monkeypatch):
    """Dropping the per-expert scales (or using one expert fewer) moves the logits, so the test
    above would see a wrong routing; --moe-n-expert sets the experts used per token."""
    write_hf_moe(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    convert_cli(tmp_path / "hf", out, monkeypatch)

    def logits(edit=None):
        lm = load_model(out, kernels="torch")
        for blk in lm.model.blocks:
            if edit:
                edit(blk.moe)
        with torch.inference_mode():
            return lm.model.forward(torch.tensor(IDS), lm.new_cache(64, 32)).logits[0]

    base = logits()
    assert _rel_rms(logits(lambda m: setattr(m, "exp_scale", None)), base) > 1e-3
    one = logits(lambda m: setattr(m, "k", 1))
    assert _rel_rms(one, base) > 1e-3
    lm = load_model(out, kernels="torch", moe_n_expert=1)  # --moe-n-expert 1 is that top-1 model
    with torch.inference_mode():
        got = lm.model.forward(torch.tensor(IDS), lm.new_cache(64, 32)).logits[0]
    assert _rel_rms(got, one) < 1e-6


def test_moe_config_errors_are_one_line(tmp_path):
    from llmkit.core.convert.hf import convert
    from llmkit.core.model.config import read_config
    from llmkit.core.models import gemma4

    write_hf_moe(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.gguf")
    md = dict(GGUFFile(tmp_path / "m.gguf").metadata)
    V = {"n_vocab": len(md["tokenizer.ggml.tokens"])}
    assert read_config(gemma4.Config, md, "gemma4", **V).n_ff_exp == 24
    for key, bad, msg in [
        ("expert_used_count", 0, "expert_used_count in 1..8"),
        ("expert_used_count", 9, "expert_used_count in 1..8"),
        ("expert_feed_forward_length", 0, "expert_feed_forward_length"),
        ("expert_count", -1, "expert_count"),
    ]:
        with pytest.raises(LlmkitError, match=msg):
            read_config(gemma4.Config, md | {f"gemma4.{key}": bad}, "gemma4", **V)
    with pytest.raises(LlmkitError, match="--moe-n-expert 9 must be between 1 and 8"):
        load_model(tmp_path / "m.gguf", moe_n_expert=9)
    cfg = tmp_path / "hf" / "config.json"
    c = json.loads(cfg.read_text())
    c["top_k_experts"] = 9
    cfg.write_text(json.dumps(c))
    with pytest.raises(LlmkitError, match="top_k_experts in 1..num_experts"):
        convert(tmp_path / "hf", tmp_path / "x.gguf")
