"""Scale-out: tensor parallelism over gloo ranks on the CPU (`llm run --tp 2`, torchrun-style
launches) and the layer split over several CPU "devices": greedy output identical to one
process, each rank holding about half the weights, and one clear error on every rank."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from cli_run import llm
from llmkit.core.distributed.launch import parse_layer_split
from llmkit.core.distributed.pipeline import assign_layers
from llmkit.core.distributed.shard import col_slice, row_slice, span, spans
from llmkit.core.gguf.writer import encode_tensor
from llmkit.errors import LlmkitError
from llmkit.quant.tensor import QTensor
from tiny_models import write_tiny_gemma3, write_tiny_llama
from tiny_step35 import write_tiny_step35

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    return {
        "llama": write_tiny_llama(d / "llama.gguf", n_layer=3, tied=False),
        "step35": write_tiny_step35(d / "step35.gguf", draft_noise=0.3),
        "gemma3": write_tiny_gemma3(d / "gemma3.gguf", n_head=4, n_head_kv=2),
        "gemma3_kv1": write_tiny_gemma3(d / "gemma3_kv1.gguf", seed=1, n_head=4, n_head_kv=1),
    }


def _run(capsys, monkeypatch, tmp_path, model, *args, tag="x"):
    stats = tmp_path / f"{tag}.json"
    rc, out, err = llm(capsys, monkeypatch, "run", "-m", model, "-n", 16, "--temp", 0,
                       "--no-display-prompt", "--stats-json", stats, *args)  # fmt: skip
    assert rc == 0, err
    return json.loads(stats.read_text()), err


def test_spans_and_block_cuts():
    assert [span(3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]
    assert spans(49152, 2) == [24576, 24576] and sum(spans(7, 3)) == 7
    raw = torch.from_numpy(encode_tensor(torch.randn(4, 128).numpy(), QT.Q8_0).data)
    t = QTensor("w", QT.Q8_0, (4, 128), raw.view(torch.uint8).reshape(4, -1))
    full = t.dequantize()
    assert torch.equal(col_slice(t, 32, 128).dequantize(), full[:, 32:])
    assert torch.equal(row_slice(t, 1, 3).dequantize(), full[1:3])
    with pytest.raises(LlmkitError, match="blocks hold 32 values"):
        col_slice(t, 0, 48)


def test_tp2_llama_matches_tp1(capsys, monkeypatch, tmp_path, tiny):
    ref, _ = _run(capsys, monkeypatch, tmp_path, tiny["llama"], "-p", "the cat sat", tag="a")
    got, err = _run(capsys, monkeypatch, tmp_path, tiny["llama"], "-p", "the cat sat",
                    "--tp", 2, "-v", tag="b")  # fmt: skip
    assert got["tokens"] == ref["tokens"] and len(ref["tokens"]) == 16
    ranks = [line for line in err.splitlines() if line.startswith("tp rank")]
    assert len(ranks) == 2, err


def test_tp2_step35_mtp_matches_tp1(capsys, monkeypatch, tmp_path, tiny):
    """Experts split across ranks, NextN heads sharded, verify batches and rollbacks in step."""
    args = ("-p", "the cat sat on the mat", "--mtp", "--draft", 3)
    ref, _ = _run(capsys, monkeypatch, tmp_path, tiny["step35"], *args, tag="a")
    got, _ = _run(capsys, monkeypatch, tmp_path, tiny["step35"], *args, "--tp", 2, tag="b")
    assert got["tokens"] == ref["tokens"]
    spec = got["speculative"]
    assert spec["accepted_tokens"] == ref["speculative"]["accepted_tokens"]
    assert 0 < spec["accepted_tokens"] < spec["draft_tokens"]  # accepts and rollbacks both ran


@pytest.mark.parametrize("name", ["gemma3", "gemma3_kv1"])
def test_tp2_gemma3_matches_tp1(capsys, monkeypatch, tmp_path, tiny, name):
    """Post-norms after the gathered attn_output / ffn_down, sliding and global layers past the
    window; gemma3_kv1: one KV head replicated on both ranks, two query heads each."""
    args = ("-p", "the cat sat on the mat and the dog ran", "-n", 24)
    ref, _ = _run(capsys, monkeypatch, tmp_path, tiny[name], *args, tag="a")
    got, err = _run(capsys, monkeypatch, tmp_path, tiny[name], *args, "--tp", 2, "-v", tag="b")
    assert got["tokens"] == ref["tokens"] and len(ref["tokens"]) == 24
    assert len([line for line in err.splitlines() if line.startswith("tp rank")]) == 2, err


@pytest.mark.parametrize("n_kv", [2, 1])
def test_tp2_gemma4_matches_tp1(capsys, monkeypatch, tmp_path, n_kv):
    """Gemma 4: sliding layers (head dim 16) and full layers (head dim 32), 2 KV heads (one per
    rank) or 1 (replicated, two query heads each), KV-shared trailing layers reading their
    owner's cache on each rank, replicated per-layer embeddings, double-wide FFNs, softcap."""
    pytest.importorskip("transformers")
    from test_gemma4 import convert_cli, write_hf_gemma4

    write_hf_gemma4(tmp_path / "hf", num_key_value_heads=n_kv, initializer_range=0.05)
    model = tmp_path / "g4.gguf"
    convert_cli(tmp_path / "hf", model, monkeypatch)
    capsys.readouterr()
    from llmkit.core.gguf.reader import GGUFFile

    md = GGUFFile(model).metadata
    assert md["gemma4.attention.shared_kv_layers"] == 2 and md["gemma4.attention.key_length"] == 32
    assert md["gemma4.feed_forward_length"][-1] == 2 * md["gemma4.feed_forward_length"][0]
    args = ("-p", "the river that runs through the old town", "-n", 24, "--ignore-eos")
    ref, _ = _run(capsys, monkeypatch, tmp_path, model, *args, tag="a")
    got, err = _run(capsys, monkeypatch, tmp_path, model, *args, "--tp", 2, "-v", tag="b")
    assert got["tokens"] == ref["tokens"] and len(ref["tokens"]) == 24
    assert len(set(ref["tokens"])) > 6  # not one repeated token
    assert len([line for line in err.splitlines() if line.startswith("tp rank")]) == 2, err


def test_tp_gemma4_refusals():
    """Gemma 4's MoE blocks are not split; one n_head over layers whose KV heads split the query
    heads unevenly on some rank cannot be described by the rank's config."""
    from types import SimpleNamespace

    from llmkit.core.distributed.shard import check_shardable

    cfg = SimpleNamespace(n_layer_all=2, n_head=8, n_head_kv=[2, 2], n_vocab=64, n_embd=32)
    check_shardable("gemma4", cfg, 2)
    with pytest.raises(LlmkitError, match="gemma4 mixture-of-experts blocks are not split"):
        check_shardable("gemma4", SimpleNamespace(**vars(cfg), n_expert=4), 2)
    with pytest.raises(LlmkitError, match="8 query heads split unevenly over layers with"):
        check_shardable("gemma4", SimpleNamespace(**vars(cfg) | {"n_head_kv": [4, 8]}), 3)


def test_tp2_sum_mode_runs_in_step(capsys, monkeypatch, tmp_path, tiny):
    """Megatron partial sums: every rank on rank 0's tokens (greedy may differ from tp=1 only
    at near-ties; on this model it does not)."""
    ref, _ = _run(capsys, monkeypatch, tmp_path, tiny["llama"], "-p", "hello world", tag="a")
    got, _ = _run(capsys, monkeypatch, tmp_path, tiny["llama"], "-p", "hello world",
                  "--tp", 2, "--tp-mode", "sum", tag="b")  # fmt: skip
    assert len(got["tokens"]) == len(ref["tokens"])


def test_tp2_smollm_matches_tp1_half_weights(capsys, monkeypatch, tmp_path, smollm_gguf):
    args = ("-p", "The capital of France is", "-c", 256)
    ref, _ = _run(capsys, monkeypatch, tmp_path, smollm_gguf, *args, tag="a")
    got, err = _run(capsys, monkeypatch, tmp_path, smollm_gguf, *args, "--tp", 2, "-v", tag="b")
    assert got["tokens"] == ref["tokens"]
    per_rank = [float(line.split()[4]) for line in err.splitlines() if line.startswith("tp rank")]
    total = os.path.getsize(smollm_gguf) / 2**20
    assert len(per_rank) == 2 and all(0.4 * total < w < 0.56 * total for w in per_rank), err


def test_tp2_real_gemma3_replicated_kv_head(capsys, monkeypatch, tmp_path, gemma_gguf):
    """Gemma 3 270M: 1 KV head, 4 query heads: the KV head on both ranks, 2 query heads each."""
    args = ("-p", "The capital of France is", "-c", 256)
    ref, _ = _run(capsys, monkeypatch, tmp_path, gemma_gguf, *args, tag="a")
    got, err = _run(capsys, monkeypatch, tmp_path, gemma_gguf, *args, "--tp", 2, "-v", tag="b")
    assert got["tokens"] == ref["tokens"]
    per_rank = [float(line.split()[4]) for line in err.splitlines() if line.startswith("tp rank")]
    assert len(per_rank) == 2 and all(
        w < 0.56 * os.path.getsize(gemma_gguf) / 2**20 for w in per_rank
    )


def test_tp_refuses_bad_split_before_spawning(capsys, monkeypatch, tmp_path, tiny):
    rc, _, err = llm(capsys, monkeypatch, "run", "-m", tiny["llama"], "-p", "hi", "--tp", 3)
    assert rc == 1 and err.strip().splitlines() == [
        "error: --tp 3: layer 0 has 2 KV heads and 4 query heads: each rank holds whole KV-head "
        "groups, or one replicated KV head and an even share of its query heads"
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_style_rank_with_bad_input_fails_every_rank(tiny, tmp_path):
    """Launched as torchrun does (RANK / WORLD_SIZE / MASTER_*): rank 1 cannot read its model
    file; both ranks exit 1 with the same error line, nobody hangs."""
    port, procs = _free_port(), []
    for rank, model in ((0, tiny["llama"]), (1, tmp_path / "missing.gguf")):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LLMKIT_TP_TIMEOUT="30")  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llmkit", "run", "-m", str(model), "-p", "hi", "-n", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        ))  # fmt: skip
    results = [p.communicate(timeout=90) for p in procs]
    errs = [e.strip().splitlines()[-1] for _, e in results]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert "missing.gguf" in errs[1] and errs[0].endswith(errs[1].removeprefix("error: "))


def test_layer_split_two_cpu_devices_matches(capsys, monkeypatch, tmp_path, tiny):
    from llmkit.core.api import LLM
    from llmkit.core.decode.sampling import SamplerParams

    assert assign_layers(4, (1, 1)) == [0, 0, 1, 1] and assign_layers(3, (1, 2)) == [0, 1, 1]
    assert parse_layer_split("layer", "1,1", "cpu") == (("cpu", "cpu"), (1.0, 1.0))
    with pytest.raises(LlmkitError, match="--tensor-split needs two"):
        parse_layer_split("layer", "1", None)
    p = SamplerParams(temp=0.0, seed=1)
    for path, mtp in ((tiny["llama"], False), (tiny["step35"], True)):
        ids = [1, 260, 262, 263, 264, 265]
        ref = list(LLM.load(str(path), n_ctx=128, mtp=mtp).generate_ids(ids, p, 12))
        lm = LLM.load(str(path), n_ctx=128, mtp=mtp, layer_split=(("cpu", "cpu"), (1, 1)))
        assert list(lm.generate_ids(ids, p, 12)) == ref
        assert lm.lm.model.handovers > 0  # the rows crossed the device boundary every pass
        assert [c.layers for c in lm.cache.caches][0] == [0, 1] if mtp else True
    ref, _ = _run(capsys, monkeypatch, tmp_path, tiny["llama"], "-p", "the dog", tag="a")
    got, _ = _run(capsys, monkeypatch, tmp_path, tiny["llama"], "-p", "the dog",
                  "--split-mode", "layer", "--tensor-split", "2,1", tag="b")  # fmt: skip
    assert got["tokens"] == ref["tokens"]


def test_python_m_llmkit_runs():
    r = subprocess.run([sys.executable, "-m", "llmkit", "--help"], capture_output=True,
                       text=True, timeout=60, cwd="/tmp")  # fmt: skip
    assert r.returncode == 0 and "run" in r.stdout
