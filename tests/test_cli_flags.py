"""llama.cpp's common flags on `llm run` (and -ngl / -fa on perplexity and bench): each flag's
effect, multi-letter short flags never split, unsupported llama.cpp flags refused by name, and
Ctrl-C in a chat."""

import io
import json
import sys

import pytest

from cli_run import llm
from llmkit.cli.flags import LlamaCommand, normalize_args
from tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    return {
        "llama": write_tiny_llama(d / "llama.gguf"),
        "untied": write_tiny_llama(d / "untied.gguf", tied=False),
        "dir": d,
    }


def _run(capsys, monkeypatch, tiny, *args, model="untied", stats=None):
    """`llm run` greedy on a tiny model; -> (rc, out, err, stats dict or None)."""
    extra = ["--stats-json", stats] if stats else []
    base = ["run", "-m", tiny[model], "--temp", 0, "-c", 128, "--ignore-eos", *extra]
    rc, out, err = llm(capsys, monkeypatch, *base, *args)
    s = json.loads(stats.read_text()) if stats and rc == 0 else None
    return rc, out, err, s


def _cmd(**opts):
    """A click command with these options (name -> takes a value), for normalize_args."""
    import typer

    app = typer.Typer()

    @app.command(cls=LlamaCommand)
    def cmd(
        n: int = typer.Option(1, "-n"),
        ngl: str = typer.Option(None, "-ngl"),
        p: str = typer.Option(None, "-p"),
        fa: str = typer.Option("auto", "-fa", "--flash-attn"),
    ):
        pass

    return typer.main.get_command(app)


def test_multi_letter_short_flags_are_never_split():
    cmd = _cmd()
    ctx = cmd.make_context("cmd", [])
    assert normalize_args(cmd, ctx, ["-ngl", "-n", "4"]) == ["-ngl", "-n", "4"]
    # an option's value is never read as a flag, even when it looks like one
    assert normalize_args(cmd, ctx, ["-p", "-sys", "-n", "2"]) == ["-p", "-sys", "-n", "2"]
    assert normalize_args(cmd, ctx, ["-n5"]) == ["-n5"]  # a short flag's attached value still works
    assert normalize_args(cmd, ctx, ["-fa", "-n", "1"]) == ["-fa", "on", "-n", "1"]
    assert normalize_args(cmd, ctx, ["-fa", "off"]) == ["-fa", "off"]
    assert normalize_args(cmd, ctx, ["--flash-attn"]) == ["--flash-attn", "on"]
    with pytest.raises(Exception, match="No such option: -nx"):  # not -n with the value "x"
        normalize_args(cmd, ctx, ["-nx"])
    with pytest.raises(Exception, match="llama.cpp flag -sysf is not supported by llmkit"):
        normalize_args(cmd, ctx, ["-sysf", "f.txt"])  # a command without it: not -s ysf


def test_unsupported_llama_cpp_flags_are_named(tiny, capsys, monkeypatch):
    for flag in ("--mirostat", "-mli", "--rope-scaling", "-nkvo", "--no-jinja"):
        rc, out, err = llm(capsys, monkeypatch, "run", "-m", tiny["llama"], "-p", "x", flag)
        assert rc != 0 and err.strip() == f"error: llama.cpp flag {flag} is not supported by llmkit"
    # a flag another subcommand has is named as such, never split into -n gl
    rc, _, err = llm(capsys, monkeypatch, "tokenize", "-m", tiny["llama"], "-ngl", "1", "-p", "x")
    assert rc != 0 and err.strip() == "error: -ngl is not an option of `llm tokenize`"
    rc, _, err = llm(capsys, monkeypatch, "run", "-m", tiny["llama"], "-p", "x", "--no-such")
    assert rc != 0 and "No such option" in err


def test_ngl_without_a_gpu_notes_and_uses_the_cpu(tiny, capsys, monkeypatch, tmp_path):
    import torch

    from llmkit.core.api import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stats = tmp_path / "s.json"
    rc, out, err, s = _run(capsys, monkeypatch, tiny, "-ngl", 99, "-n", 4, "-p", "hi", stats=stats)
    assert rc == 0, err
    assert "warning: no usable GPU found, --gpu-layers option will be ignored" in err
    assert s["device"] == "cpu" and s["generated_tokens"] == 4
    rc, _, err, _ = _run(capsys, monkeypatch, tiny, "--gpu-layers", 0, "-n", 2, "-p", "hi")
    assert rc == 0 and "no usable GPU" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None, 99) == ("cuda", None) and pick_device(None, -1)[0] == "cuda"
    assert pick_device("cpu", 99) == ("cpu", None)  # an explicit --device wins
    assert pick_device(None, 0) == ("cpu", None)
    rc, _, err, _ = _run(capsys, monkeypatch, tiny, "-ngl", "many", "-p", "hi")
    assert rc != 0 and "-ngl/--n-gpu-layers must be a number" in err


def test_ngl_and_fa_on_perplexity(tiny, capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 12)
    args = ["perplexity", "-m", tiny["llama"], "-f", text, "-c", 16, "--chunks", 1]
    rc, out, err = llm(capsys, monkeypatch, *args, "-ngl", 99, "-fa")
    assert rc == 0, err
    assert "no usable GPU found" in err
    rc, _, err = llm(capsys, monkeypatch, *args, "-fa", "sometimes")
    assert rc != 0 and "-fa/--flash-attn must be on, off or auto" in err


def test_fa_mmap_mlock_jinja_no_repack_keep_the_output(tiny, capsys, monkeypatch):
    args = ["-n", 6, "-p", "the cat"]
    _, ref, _, _ = _run(capsys, monkeypatch, tiny, *args)
    for extra in (["-fa"], ["-fa", "off"], ["--flash-attn", "on"], ["--no-mmap"], ["--jinja"],
                  ["-nr"], ["--no-repack", "--mlock"]):  # fmt: skip
        rc, out, err, _ = _run(capsys, monkeypatch, tiny, *extra, *args)
        assert rc == 0 and out == ref, (extra, err)


def _locked_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def test_mlock_locks_the_weights_or_says_why(tiny, capsys, monkeypatch):
    import resource

    import llmkit

    size = tiny["untied"].stat().st_size
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    before = _locked_kib()
    lm = llmkit.load(tiny["untied"], n_ctx=64, use_mlock=True)
    if limit == resource.RLIM_INFINITY or limit - before * 1024 > size + 8192:
        assert _locked_kib() - before >= size // 1024 and not lm.warnings
    else:
        assert any("failed to mlock" in w and "RLIMIT_MEMLOCK" in w for w in lm.warnings)


def test_reverse_prompt_stops_the_text(tiny, capsys, monkeypatch, tmp_path):
    args = ["-n", 24, "-p", "the cat", "--no-display-prompt"]
    _, full, _, _ = _run(capsys, monkeypatch, tiny, *args)
    full = full.rstrip("\n")
    rp = full[6:9]  # a stretch from the middle of the greedy text
    cut = full.index(rp) + len(rp)
    rc, out, err, s = _run(capsys, monkeypatch, tiny, "-r", rp, *args, stats=tmp_path / "s.json")
    assert rc == 0, err
    out = out.rstrip("\n")  # the token that completes the reverse prompt is printed whole
    assert out.startswith(full[:cut]) and full.startswith(out) and len(out) < len(full)
    assert s["generated_tokens"] < 24


def test_logit_bias_bans_a_token_and_penalties_reach_the_sampler(
    tiny, capsys, monkeypatch, tmp_path
):
    st = tmp_path / "s.json"
    args = ["-n", 12, "-p", "the cat"]
    _, _, _, ref = _run(capsys, monkeypatch, tiny, *args, stats=st)
    top = ref["tokens"][0]
    rc, _, err, s = _run(capsys, monkeypatch, tiny, "-l", f"{top}-inf", *args, stats=st)
    assert rc == 0, err
    assert top not in s["tokens"]
    # an upward bias makes a token the greedy choice
    rc, _, err, s = _run(capsys, monkeypatch, tiny, "--logit-bias", "300+100", *args, stats=st)
    assert rc == 0 and s["tokens"] == [300] * 12, err
    # the tied model repeats one token, ~27 nats ahead: 2.0 per repeat flips it after 14
    _, _, _, ref = _run(capsys, monkeypatch, tiny, "-n", 24, "-p", "x", model="llama", stats=st)
    assert len(set(ref["tokens"])) == 1
    rc, _, err, s = _run(capsys, monkeypatch, tiny, "--frequency-penalty", 2, "-n", 24, "-p", "x",
                         model="llama", stats=st)  # fmt: skip
    assert rc == 0 and len(set(s["tokens"])) > 1, err
    import llmkit.core.api as api

    seen, real = [], api.sampler_params
    monkeypatch.setattr(api, "sampler_params", lambda **kw: seen.append(kw) or real(**kw))
    rc, _, err, s = _run(capsys, monkeypatch, tiny, "--presence-penalty", 1.5, *args)
    assert rc == 0 and seen[-1]["presence_penalty"] == 1.5, err
    for bad, msg in (("12x3", "expected TOKEN_ID(+|-)BIAS"), ("99999+1", "outside the vocab")):
        rc, _, err, _ = _run(capsys, monkeypatch, tiny, "-l", bad, *args)
        assert rc != 0 and msg in err


def _chat(capsys, monkeypatch, tiny, stdin, *args, stats=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return _run(capsys, monkeypatch, tiny, "-cnv", "-n", 5, "-c", 256, *args, stats=stats)


def test_system_prompt_file_and_chat_template(tiny, capsys, monkeypatch, tmp_path):
    st = tmp_path / "s.json"
    _, _, _, by_flag = _chat(capsys, monkeypatch, tiny, "the cat\n", "-sys", "be brief", stats=st)
    f = tmp_path / "sys.txt"
    f.write_text("be brief")
    rc, _, err, by_file = _chat(capsys, monkeypatch, tiny, "the cat\n", "-sysf", f, stats=st)
    assert rc == 0, err
    assert by_file["prompt_tokens"] == by_flag["prompt_tokens"]
    _, _, _, no_sys = _chat(capsys, monkeypatch, tiny, "the cat\n", stats=st)
    assert no_sys["prompt_tokens"] < by_flag["prompt_tokens"]
    rc, _, err, _ = _chat(capsys, monkeypatch, tiny, "x\n", "-sys", "a", "-sysf", f)
    assert rc != 0 and "either -sys or -sysf" in err
    # --chat-template: a built-in name, or a jinja template (string or file)
    rc, _, err, gem = _chat(capsys, monkeypatch, tiny, "the cat\n", "--chat-template", "gemma",
                            "-v", stats=st)  # fmt: skip
    assert rc == 0 and "chat template: built-in gemma (--chat-template)" in err
    assert gem["prompt_tokens"] != no_sys["prompt_tokens"]
    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rc, _, err, raw = _chat(
        capsys, monkeypatch, tiny, "the cat\n", "--chat-template", tpl, stats=st
    )
    assert rc == 0 and raw["prompt_tokens"] < no_sys["prompt_tokens"], err
    tf = tmp_path / "tpl.jinja"
    tf.write_text(tpl)
    rc, _, err, raw2 = _chat(capsys, monkeypatch, tiny, "the cat\n", "--chat-template-file", tf,
                             stats=st)  # fmt: skip
    assert rc == 0 and raw2["prompt_tokens"] == raw["prompt_tokens"], err
    rc, _, err, _ = _chat(capsys, monkeypatch, tiny, "x\n", "--chat-template", "nosuch")
    assert rc != 0 and "unknown chat template 'nosuch'" in err


def test_cnv_and_no_cnv(tiny, capsys, monkeypatch):
    rc, out, err, _ = _run(capsys, monkeypatch, tiny, "-no-cnv", "-n", 3, "-p", "the cat")
    assert rc == 0 and out.startswith("the cat"), err
    rc, out2, err, _ = _run(capsys, monkeypatch, tiny, "--no-cnv", "-n", 3, "-p", "the cat")
    assert rc == 0 and out2 == out, err
    rc, _, err, _ = _run(capsys, monkeypatch, tiny, "-cnv", "-no-cnv", "-n", 3)
    assert rc != 0 and "no prompt" in err  # the later flag wins: not chat, so a prompt is needed


def test_reverse_prompt_in_chat_returns_to_the_prompt(tiny, capsys, monkeypatch, tmp_path):
    st = tmp_path / "s.json"
    rc, out, err, s = _chat(capsys, monkeypatch, tiny, "the cat\nthe dog\n", stats=st)
    reply = out.split("\n")[0]
    assert rc == 0 and len(reply) > 2, err
    rc, out, err, s = _chat(capsys, monkeypatch, tiny, "the cat\nthe dog\n", "-r", reply[:2],
                            stats=st)  # fmt: skip
    assert rc == 0, err
    first = out.split("\n")[0]  # the token completing the reverse prompt is printed whole
    assert first.startswith(reply[:2]) and len(first) < len(reply)
    assert len(out.strip().split("\n")) == 2  # the second turn still ran


def _interrupt(monkeypatch, turns, after=2):
    """LLM.stream raises KeyboardInterrupt after `after` pieces of the given (1-based) turns."""
    from llmkit.core.api import LLM

    real, count = LLM.stream, [0]

    def stream(llm, *args, **kw):
        count[0] += 1
        turn = count[0]
        for i, piece in enumerate(real(llm, *args, **kw)):
            if turn in turns and i == after:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(LLM, "stream", stream)


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(tiny, capsys, monkeypatch, tmp_path):
    st = tmp_path / "s.json"
    _, full, _, _ = _chat(capsys, monkeypatch, tiny, "the cat\nthe dog\n", stats=st)
    _interrupt(monkeypatch, turns={1})
    rc, out, err, s = _chat(capsys, monkeypatch, tiny, "the cat\nthe dog\n", stats=st)
    assert rc == 0, err
    assert "reply interrupted" in err
    lines = out.split("\n")
    assert len(lines[0]) < len(full.split("\n")[0])  # the first reply was cut short
    assert lines[1] == full.split("\n")[1]  # the second turn ran as before


def test_ctrl_c_at_the_prompt_or_twice_exits(tiny, capsys, monkeypatch, tmp_path):
    class Stdin(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Stdin())
    rc, out, err, s = _run(capsys, monkeypatch, tiny, "-cnv", "-n", 3, model="llama",
                           stats=tmp_path / "s.json")  # fmt: skip
    assert rc == 0 and s["generated_tokens"] == 0, err  # the chat ended cleanly, stats written
    # two interrupts within a second: the second one ends the program
    _interrupt(monkeypatch, turns={1, 2})
    rc, out, err, _ = _chat(capsys, monkeypatch, tiny, "the cat\nthe dog\nthe mat\n")
    assert rc == 130 and err.count("reply interrupted") == 1, err  # no third turn
