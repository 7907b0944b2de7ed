"""Perplexity as llama-perplexity computes it, against llama.cpp's figure on the real models, and
KL divergence against a saved base run (scripts/make_ppl_refs.py records the references)."""

import json
from pathlib import Path

import pytest

from cli_run import llm
from llmkit.core.models.loader import load_model
from llmkit.core.perplexity import perplexity
from llmkit.core.tokenizer import load_tokenizer
from tiny_models import write_tiny_llama

DATA = Path(__file__).parent / "data"
TEXT = DATA / "ppl_text.txt"


def _ppl(path):
    lm = load_model(path)
    tok = load_tokenizer(lm.metadata)
    ids = tok.encode(TEXT.read_text(), add_special=True, parse_special=False)
    return perplexity(
        lm.model, lambda n: lm.new_cache(n, margin=n), ids, 512, tok.bos_id if tok.add_bos else None
    )


@pytest.mark.parametrize("fixture", ["smollm_gguf", "gemma_gguf"])
def test_real_model_ppl_within_one_percent_of_llama_cpp(request, fixture):
    path = request.getfixturevalue(fixture)
    ref = next(
        m
        for m in json.loads((DATA / "ppl_refs.json").read_text())["models"]
        if m["model"] == path.name
    )
    res = _ppl(path)
    assert res.n_tokens == ref["scored"]
    assert abs(res.ppl / ref["ppl"] - 1) < 0.01, (res.ppl, ref["ppl"])


def test_cli_ppl_and_kl_divergence(tmp_path, capsys, monkeypatch):
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1, n_vocab=400, tied=False)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2, n_vocab=400, tied=False)
    base = tmp_path / "base.kld"
    rc, out, err = llm(
        capsys,
        monkeypatch,
        "perplexity",
        "-m",
        a,
        "-f",
        TEXT,
        "-c",
        128,
        "--kl-divergence-base",
        base,
    )
    assert rc == 0, err
    assert (
        out.startswith("Final estimate: PPL = ") and "+/-" in out and "[1]" in err and base.exists()
    )
    rc, out, err = llm(
        capsys,
        monkeypatch,
        "perplexity",
        "-m",
        a,
        "-f",
        TEXT,
        "-c",
        128,
        "--kl-divergence-base",
        base,
        "--kl-divergence",
    )
    assert rc == 0, err
    # a model against itself: only the fp16 rounding of the saved base log-probs remains
    assert float(out.split("Mean    KLD:")[1].split()[0]) < 1e-3
    assert float(out.split("Same top p :")[1].split()[0]) > 99.0
    rc, out, err = llm(
        capsys,
        monkeypatch,
        "perplexity",
        "-m",
        b,
        "-f",
        TEXT,
        "-c",
        128,
        "--kl-divergence-base",
        base,
        "--kl-divergence",
    )
    assert rc == 0, err
    kld = float(out.split("Mean    KLD:")[1].split()[0])
    assert kld > 0.01
    for args, msg in [
        (["-c", 100000], "need at least"),
        (["-c", 4], "at least 8"),
        (["--kl-divergence"], "needs --kl-divergence-base"),
        (["-c", 64, "--kl-divergence-base", base, "--kl-divergence"], "another text or -c"),
    ]:
        rc, out, err = llm(capsys, monkeypatch, "perplexity", "-m", a, "-f", TEXT, *args)
        assert rc == 1 and msg in err and "Traceback" not in err, (args, err)
