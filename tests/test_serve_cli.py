"""`llm serve` flags: bad values are one line on stderr and a non-zero exit, before any socket."""

import pytest

from cli_run import llm
from tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("serve_cli") / "llama.gguf", seed=1)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["-np", "0"], "-np must be >= 1"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--kv-block-size", "0"], "--kv-block-size must be >= 1"),
        (["-ctk", "q9"], "unsupported K cache type q9"),
        (["--draft-policy", "sometimes"], "--draft-policy must be adaptive or fixed"),
        (["--mtp"], "no NextN"),
        (["-md", "x.gguf"], "needs --mtp"),
        (["--draft-p-min", "2"], "--draft-p-min must be in [0, 1]"),
        (["--max-queue", "0"], "--max-queue must be >= 1"),
        (["--timeout", "0"], "--timeout must be a finite number > 0"),
        (["--timeout", "nan"], "--timeout must be a finite number > 0"),
    ],
)
def test_bad_flags_give_one_line_errors(tiny, capsys, monkeypatch, args, msg):
    rc, out, err = llm(capsys, monkeypatch, "serve", "-m", tiny, "--port", "0", *args)
    assert rc != 0 and msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_model_is_one_line(capsys, monkeypatch):
    rc, _, err = llm(capsys, monkeypatch, "serve", "-m", "/nonexistent.gguf")
    assert rc == 1 and err.startswith("error: model file not found")


@pytest.mark.parametrize(
    "args, msg",
    [
        (["-fa", "sometimes"], "-fa/--flash-attn must be on, off or auto"),
        (["--chat-template", "vicuna-ish"], "unknown chat template 'vicuna-ish'"),
    ],
)
def test_bad_llama_flags_give_one_line_errors(tiny, capsys, monkeypatch, args, msg):
    rc, out, err = llm(capsys, monkeypatch, "serve", "-m", tiny, "--port", "0", *args)
    assert rc != 0 and msg in err and err.count("\n") == 1


def test_llama_cpp_flags_reach_the_server(tiny, capsys, monkeypatch):
    """`llm serve -ngl 99 -fa on --jinja --mlock --no-mmap --chat-template chatml` starts: the
    template override is what the server renders, -ngl falls back to the CPU with llama.cpp's
    note on a machine without a GPU."""
    import torch

    from llmkit.core.serve.server import Server
    from llmkit.core.tokenizer.chat import CHATML

    seen = {}

    def fake_serve_forever(self):
        seen["template"], seen["source"] = self.prompter.template, self.prompter.template_source
        seen["device"] = str(self.engine.lm.model.backend.device)

    monkeypatch.setattr(Server, "serve_forever", fake_serve_forever)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = llm(capsys, monkeypatch, "serve", "-m", tiny, "--port", "0", "-ngl", "99",
                       "-fa", "on", "--jinja", "--mlock", "--no-mmap", "--chat-template", "chatml")  # fmt: skip
    assert rc == 0, err
    assert seen["template"] == CHATML and "chatml" in seen["source"]
    assert seen["device"] == "cpu" and "no usable GPU found" in err
