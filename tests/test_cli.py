"""The `llm` command end to end on tiny models: output, stats JSON, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from cli_run import llm
from llmkit.core.gguf.writer import RawTensor
from tiny_models import write_tiny_gemma3, write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {
        "llama": write_tiny_llama(d / "llama.gguf"),
        "untied": write_tiny_llama(d / "untied.gguf", tied=False),  # flatter logits, for sampling
        "gemma3": write_tiny_gemma3(d / "gemma3.gguf"),
        "dir": d,
    }


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_run_greedy_writes_stats(tiny, capsys, monkeypatch, arch):
    stats = tiny["dir"] / f"{arch}.json"
    rc, out, err = llm(
        capsys,
        monkeypatch,
        "run",
        "-m",
        tiny[arch],
        "-p",
        "the cat sat",
        "-n",
        12,
        "--temp",
        0,
        "--ignore-eos",
        "-c",
        64,
        "--stats-json",
        stats,
        "--verbose",
    )
    assert rc == 0, err
    assert out.startswith("the cat sat")
    assert "prompt eval time" in err and "eval time" in err and "kv cache (main)" in err
    s = json.loads(stats.read_text())
    assert s["generated_tokens"] == 12 == len(s["tokens"])
    assert s["prompt_tokens"] > 0 and s["decode_tok_per_s"] > 0 and s["prompt_tok_per_s"] > 0
    kv = s["memory"]["kv"]["main"]
    assert kv["layers"] == list(range(7 if arch == "gemma3" else 2)) and kv["bytes"] > 0
    assert s["memory"]["weights_bytes"] > 0
    # greedy is deterministic
    rc, out2, _ = llm(
        capsys,
        monkeypatch,
        "run",
        "-m",
        tiny[arch],
        "-p",
        "the cat sat",
        "-n",
        12,
        "--temp",
        0,
        "--ignore-eos",
        "-c",
        64,
    )
    assert out2 == out


def test_seeded_sampling_is_reproducible(tiny, capsys, monkeypatch):
    args = [
        "run",
        "-m",
        tiny["untied"],
        "-p",
        "hello",
        "-n",
        16,
        "--temp",
        1.5,
        "--top-k",
        0,
        "--top-p",
        1.0,
        "--min-p",
        0.0,
        "--ignore-eos",
        "-s",
        42,
    ]
    outs = [llm(capsys, monkeypatch, *args)[1] for _ in range(2)]
    other = llm(capsys, monkeypatch, *args[:-1], 43)[1]
    assert outs[0] == outs[1] and outs[0] != other


def test_tokenize_command(tiny, capsys, monkeypatch):
    rc, out, err = llm(
        capsys, monkeypatch, "tokenize", "-m", tiny["llama"], "-p", "the cat", "--ids"
    )
    assert rc == 0, err
    assert out.strip().startswith("[1,")


def _write_variant(tiny, name, edit):
    return write_tiny_llama(tiny["dir"] / name, edit=edit)


def _drop_tensor(md, t):
    del t["blk.1.ffn_up.weight"]


def _unknown_arch(md, t):
    for k in [k for k in md if k.startswith("llama.")]:
        md["foo" + k[5:]] = md.pop(k)
    return "foo"


def _q8_1_tensor(md, t):
    # a Q8_1 tensor (llama.cpp's activation-only type): the loader must refuse it by name
    rows, cols = t["blk.0.attn_q.weight"].shape
    block, type_size = GGML_QUANT_SIZES[QT.Q8_1]
    data = np.zeros((rows, cols // block * type_size), dtype=np.uint8)
    t["blk.0.attn_q.weight"] = RawTensor(data, QT.Q8_1, (rows, cols))


def test_bad_inputs_give_one_line(tiny, capsys, monkeypatch):
    d = tiny["dir"]
    trunc = d / "trunc.gguf"
    trunc.write_bytes(tiny["llama"].read_bytes()[:5000])
    magic = d / "magic.gguf"
    magic.write_bytes(b"GGML" + tiny["llama"].read_bytes()[4:])
    cases = [
        (["-m", trunc, "-p", "x"], "truncated"),
        (["-m", magic, "-p", "x"], "not a GGUF file"),
        (
            ["-m", _write_variant(tiny, "arch.gguf", _unknown_arch), "-p", "x"],
            "unknown architecture 'foo'",
        ),
        (
            ["-m", _write_variant(tiny, "miss.gguf", _drop_tensor), "-p", "x"],
            "missing tensor blk.1.ffn_up.weight",
        ),
        (
            ["-m", _write_variant(tiny, "q81.gguf", _q8_1_tensor), "-p", "x"],
            "unsupported type Q8_1",
        ),
        (
            ["-m", tiny["llama"], "-p", "the cat sat on the mat " * 20, "-c", 32],
            "prompt is too long",
        ),
        (["-m", d / "nope.gguf", "-p", "x"], "model file not found"),
        (["-m", tiny["llama"]], "no prompt"),
        (["-m", tiny["llama"], "-p", "x", "-n", -5], "-n must be >= -1"),
        (["-m", tiny["llama"], "-p", "x", "--top-p", 1.5], "--top-p"),
        (["-m", tiny["llama"], "-p", "x", "--temp", "nan"], "--temp must be a finite number"),
        (["-m", tiny["llama"], "-p", "x", "--device", "tpu"], "unknown device"),
        (["-m", tiny["llama"], "-p", "x", "--temp", "hot"], "Invalid value"),
        (["-m", tiny["llama"], "-p", "x", "--no-such-flag"], "No such option"),
    ]
    for args, msg in cases:
        rc, out, err = llm(capsys, monkeypatch, "run", *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc != 0, (args, err)
        assert len(lines) == 1 and msg in lines[0], (args, err)
        assert "Traceback" not in err


def test_console_script_help_and_error():
    exe = [sys.executable, "-m", "llmkit.cli.app"]
    r = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "tokenize" in r.stdout
    r = subprocess.run(
        [*exe, "run", "-m", "/nonexistent.gguf", "-p", "hi"], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.strip().startswith("error: model file not found")


def test_chat_mode_reuses_the_cached_prefix(tiny, capsys, monkeypatch, tmp_path):
    import io

    stats = tmp_path / "chat.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\nthe dog\n"))
    rc, out, err = llm(
        capsys,
        monkeypatch,
        "run",
        "-m",
        tiny["llama"],
        "-cnv",
        "-sys",
        "be brief",
        "-n",
        5,
        "--temp",
        0,
        "--ignore-eos",
        "-c",
        256,
        "--stats-json",
        stats,
    )
    assert rc == 0, err
    s = json.loads(stats.read_text())
    assert s["generated_tokens"] == 10  # -n applies per turn
    # turn 2 only evaluates what follows the cached conversation, not the whole transcript again
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.core.tokenizer import load_tokenizer
    from llmkit.core.tokenizer.chat import CHATML, render_chat

    tok = load_tokenizer(GGUFFile(tiny["llama"]).metadata)
    sys_msg, u1, u2 = (
        {"role": r, "content": c}
        for r, c in (("system", "be brief"), ("user", "the cat"), ("user", "the dog"))
    )
    turn1 = len(tok.encode(render_chat(CHATML, [sys_msg, u1])))
    turn2_min = len(
        tok.encode(render_chat(CHATML, [sys_msg, u1, {"role": "assistant", "content": ""}, u2]))
    )
    # without reuse turn 2 would evaluate its whole transcript (>= turn2_min tokens) again
    assert turn1 < s["prompt_tokens"] < turn1 + turn2_min
