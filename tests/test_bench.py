"""`llm bench` on tiny models: every output format, an MTP sweep on a step35 model with NextN
blocks, an early-exit sweep (alone and next to MTP rows, output checked against the plain row),
KV-type/depth sweeps, real-text prompts, the planning order, and one-line errors. Speeds are
never asserted, only that figures exist and agree with their samples."""

import csv
import io
import json
import statistics

import pytest
import torch

from cli_run import llm
from llmkit.core.bench.params import BUILTIN_PROMPTS, BenchParams, Instance, mean_std, plan, rows
from llmkit.core.bench.report import _notes, _params, _size, set_lossless
from llmkit.core.bench.runner import Session
from tiny_models import write_tiny_gemma3, write_tiny_llama
from tiny_step35 import write_tiny_step35

FAST = ["-p", 16, "-n", 8, "-r", 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return {
        "llama": write_tiny_llama(d / "llama.gguf"),
        "llama4": write_tiny_llama(d / "llama4.gguf", n_layer=4),  # early exit at 1..3
        "gemma3": write_tiny_gemma3(d / "gemma3.gguf"),  # head dim 32: q-type KV caches fit
        "step35": write_tiny_step35(d / "step35.gguf", seed=4, draft_noise=0.2),
        "no_nextn": write_tiny_step35(d / "no_nextn.gguf", seed=4, n_nextn=0),
        "dir": d,
    }


def bench_json(capsys, monkeypatch, *args):
    rc, out, err = llm(capsys, monkeypatch, "bench", *args, "-o", "json")
    assert rc == 0, err
    return json.loads(out), err


def check_figures(rec, reps=2):
    assert len(rec["samples_ns"]) == len(rec["samples_ts"]) == reps
    assert all(ns > 0 for ns in rec["samples_ns"])
    assert rec["avg_ts"] == pytest.approx(statistics.fmean(rec["samples_ts"]))
    assert rec["stddev_ts"] == pytest.approx(statistics.stdev(rec["samples_ts"]))
    n = rec["n_prompt"] + rec["n_gen"]
    assert rec["samples_ts"][0] == pytest.approx(n * 1e9 / rec["samples_ns"][0])


def test_json_records_carry_every_field(tiny, capsys, monkeypatch):
    recs, err = bench_json(capsys, monkeypatch, "-m", tiny["llama"], *FAST)
    assert [r["test"] for r in recs] == ["pp16", "tg8"]
    assert "llama tiny Q8_0 tg8:" in err  # progress / results on stderr, never on stdout
    pp, tg = recs
    for r in recs:
        check_figures(r)
        assert r["model_type"] == "llama tiny Q8_0" and r["model_filename"] == str(tiny["llama"])
        assert r["model_size"] > 0 and r["model_n_params"] > 0 and r["weight_bytes_read"] > 0
        assert r["device"] == "cpu" and r["backends"] == "CPU" and r["cpu_info"]
        assert r["torch_version"] and "triton_version" in r and r["llmkit_version"]
        assert r["build_commit"] and r["test_time"] and r["warmup"] is True
        assert (r["type_k"], r["type_v"], r["n_ubatch"], r["n_depth"]) == ("f16", "f16", 512, 0)
        assert r["mtp"] == 0 and r["n_draft"] is None and r["speedup"] is None
        assert r["gen_input"] == "random"
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (16, 0, 0, 8)
    assert pp["bandwidth_gbs"] is None
    assert tg["bandwidth_gbs"] == pytest.approx(tg["weight_bytes_read"] * tg["avg_ts"] / 1e9)
    assert "linear_bytes" in tg["bandwidth_basis"]


def test_markdown_table_in_llama_bench_shape(tiny, capsys, monkeypatch):
    rc, out, err = llm(capsys, monkeypatch, "bench", "-m", tiny["llama"], *FAST, "-t", 1)
    assert rc == 0, err
    lines = out.splitlines()
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cols == ["model", "size", "params", "backend", "threads", "test", "t/s", "GB/s"]
    assert lines[1].startswith("| ---") and "--: |" in lines[1]
    pp = [c.strip() for c in lines[2].strip("|").split("|")]
    assert pp[:6] == ["llama tiny Q8_0", "0.07 MiB", "0.08 M", "CPU", "1", "pp16"]
    assert " ± " in pp[6] and pp[7] == "-"
    tg = [c.strip() for c in lines[3].strip("|").split("|")]
    assert tg[5] == "tg8" and float(tg[7]) >= 0
    assert "random tokens" in out and "linear_bytes" in out
    assert lines[-1].startswith("build: ") and "(llmkit " in lines[-1]


def test_jsonl_and_csv_hold_the_same_records(tiny, capsys, monkeypatch):
    args = ["bench", "-m", tiny["llama"], *FAST, "--no-warmup"]
    rc, out, err = llm(capsys, monkeypatch, *args, "-o", "jsonl")
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["test"] for r in recs] == ["pp16", "tg8"] and recs[0]["warmup"] is False
    rc, out, err = llm(capsys, monkeypatch, *args, "-o", "csv")
    assert rc == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["test"] for r in table] == ["pp16", "tg8"]
    assert list(table[0]) == list(recs[0])  # same fields, same order
    samples = [int(x) for x in table[1]["samples_ns"].split(";")]
    assert len(samples) == 2 and table[0]["bandwidth_gbs"] == "" and table[0]["warmup"] == "false"


def test_mtp_sweep_rows_acceptance_and_speedup(tiny, capsys, monkeypatch):
    args = ["-m", tiny["step35"], *FAST, "--mtp", "0,1", "--draft", "1,2"]
    recs, _ = bench_json(capsys, monkeypatch, *args)
    got = [(r["test"], r["mtp"], r["n_draft"]) for r in recs]
    assert got == [("pp16", 0, None), ("tg8", 0, None), ("tg8", 1, 1), ("tg8", 1, 2)]
    pp, base, *spec = recs
    assert pp["gen_input"] == "random" and pp["acceptance_rate"] is None
    assert base["gen_input"] == "builtin"  # the baseline decodes the same real text
    for r in spec:
        check_figures(r)
        k = r["n_draft"]
        assert r["gen_input"] == "builtin" and r["drafts"] > 0
        assert 0 < r["draft_tokens"] <= k * r["drafts"]
        assert sum(r["accepted_per_position"]) == r["accepted_tokens"] <= r["draft_tokens"]
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and len(r["acceptance_per_position"]) == k
        assert 1.0 <= r["mean_accepted_length"] <= 1 + k
        assert r["speedup"] == pytest.approx(r["avg_ts"] / base["avg_ts"])
        assert r["model_size"] > base["model_size"]  # the MTP load holds the NextN blocks
        # the paired plain runs: one per repetition, right before it, on the MTP load
        assert len(r["paired_plain_ns"]) == len(r["samples_ns"])
        assert r["speedup_paired"] == pytest.approx(
            sum(r["paired_plain_ns"]) / sum(r["samples_ns"])
        )
    assert base["speedup_paired"] is None and base["paired_plain_ns"] is None
    rc, out, err = llm(capsys, monkeypatch, "bench", *args, "--no-warmup", "-r", 1)
    assert rc == 0, err
    head = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    assert head[4:] == [
        "threads", "mtp", "draft", "test", "t/s", "GB/s", "accept", "accept/pos", "acc len",
        "speedup", "paired",
    ]  # fmt: skip
    last = [c.strip() for c in out.splitlines()[5].strip("|").split("|")]
    assert last[5:8] == ["1", "2", "tg8"] and last[-1].endswith("x")
    assert len(last[-4].split("/")) == 2  # acceptance per draft position
    assert "built-in prompt set" in out and "speedup" in out


def check_drafted(r, k):
    check_figures(r)
    assert r["gen_input"] == "builtin" and r["drafts"] > 0 and r["n_draft"] == k
    assert 0 < r["draft_tokens"] <= k * r["drafts"]
    assert sum(r["accepted_per_position"]) == r["accepted_tokens"] <= r["draft_tokens"]
    assert 0.0 <= r["acceptance_rate"] <= 1.0 and len(r["acceptance_per_position"]) == k
    per_pos = r["acceptance_per_position"]
    assert all(0.0 <= a <= 1.0 for a in per_pos) and per_pos == sorted(per_pos, reverse=True)
    assert 1.0 <= r["mean_accepted_length"] <= 1 + k
    assert r["lossless"] is True  # greedy drafting keeps the plain row's tokens


def test_early_exit_sweep_rows_acceptance_and_lossless(tiny, capsys, monkeypatch):
    args = ["-m", tiny["llama4"], *FAST, "--spec", "early-exit", "--n-layer-exit", "1,3"]
    recs, err = bench_json(capsys, monkeypatch, *args, "--draft", "1,2")
    got = [(r["test"], r["spec"], r["n_layer_exit"], r["n_draft"]) for r in recs]
    assert got == [("pp16", None, None, None), ("tg8", None, None, None)] + [
        ("tg8", "early-exit", L, k) for L in (1, 3) for k in (1, 2)
    ]
    assert "tg8 early-exit L3 draft 2:" in err
    pp, base, *spec = recs
    assert base["gen_input"] == "builtin" and base["lossless"] is None and pp["lossless"] is None
    for r in spec:
        check_drafted(r, r["n_draft"])
        assert r["mtp"] == 0 and r["draft_p_min"] == 0.0 and r["draft_branches"] == 1
        assert r["speedup"] == pytest.approx(r["avg_ts"] / base["avg_ts"])
        assert r["model_size"] == base["model_size"]  # no weights of its own
    rc, out, err = llm(capsys, monkeypatch, "bench", *args, "--no-warmup", "-r", 1)
    assert rc == 0, err
    lines = out.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[4:] == [
        "threads", "exit", "draft", "test", "t/s", "GB/s", "accept", "accept/pos", "acc len",
        "speedup", "paired",
    ]  # fmt: skip
    plain = [c.strip() for c in lines[3].strip("|").split("|")]
    ee = [c.strip() for c in lines[5].strip("|").split("|")]  # draft 3 (the default)
    assert plain[5:8] == ["-", "-", "tg8"] and ee[5:8] == ["3", "3", "tg8"]
    assert len(ee[-4].split("/")) == 3 and ee[-1].endswith("x")
    assert "early exit (--spec early-exit)" in out and "WARNING" not in out


def test_early_exit_next_to_mtp_rows_and_default_exit(tiny, capsys, monkeypatch):
    args = ["-m", tiny["step35"], "-p", 0, "-n", 8, "-r", 2, "--spec", "early-exit,mtp"]
    recs, _ = bench_json(capsys, monkeypatch, *args, "--draft", "2")
    got = [(r["spec"], r["mtp"], r["n_layer_exit"], r["n_draft"]) for r in recs]
    # no --n-layer-exit: the model's default (90% of its 4 trunk layers, at most 3)
    assert got == [(None, 0, None, None), ("mtp", 1, None, 2), ("early-exit", 0, 3, 2)]
    for r in recs[1:]:
        check_drafted(r, 2)
        assert r["speedup"] == pytest.approx(r["avg_ts"] / recs[0]["avg_ts"])


def test_lossless_compares_each_repetition_with_the_plain_row():
    base = dict(model_idx=0, threads=1, n_ubatch=512, type_k="f16", type_v="f16", depth=0)
    plain = Instance(**base, kind="tg", n=4)
    ee = Instance(**base, kind="tg", n=4, draft=2, exit_layer=1)
    mtp = Instance(**base, kind="tg", n=4, draft=2, mtp=1)
    recs = [{"test": "tg4", "lossless": None} for _ in range(3)]
    outputs = [[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]]]
    set_lossless([plain, ee, mtp], recs, outputs)
    assert [r["lossless"] for r in recs] == [None, True, False]
    p = BenchParams(models=["x"], mtp=[0, 1], n_layer_exit=[1], n_gen=[4])
    notes = _notes([{**r, "n_gen": 4} for r in recs], p)
    assert any(n.startswith("WARNING: drafted output differs") and "tg4" in n for n in notes)
    recs = [{"test": "tg4", "lossless": None} for _ in range(2)]
    set_lossless([ee, mtp], recs, outputs[1:])  # no plain row: nothing to compare with
    assert [r["lossless"] for r in recs] == [None, None]


def test_draft_p_min_sweep_gates_drafting(tiny, capsys, monkeypatch):
    args = ["-m", tiny["step35"], *FAST, "--mtp", "1", "--draft", "2", "--draft-p-min", "0,1"]
    recs, _ = bench_json(capsys, monkeypatch, *args)
    assert [(r["test"], r["draft_p_min"]) for r in recs] == [("pp16", None), ("tg8", 0.0),
                                                             ("tg8", 1.0)]  # fmt: skip
    free, gated = recs[1:]
    assert free["draft_tokens"] > 0
    assert not gated["draft_tokens"]  # no draft is ever certain enough for p_min = 1
    rc, out, err = llm(capsys, monkeypatch, "bench", *args, "--no-warmup", "-r", 1)
    assert rc == 0, err
    head = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    assert head[5:8] == ["mtp", "draft", "p_min"]


def test_draft_branches_sweep_adds_a_column_and_alternatives(tiny, capsys, monkeypatch):
    args = ["-m", tiny["step35"], *FAST, "--mtp", "1", "--draft", "1", "--draft-branches", "1,3"]
    recs, _ = bench_json(capsys, monkeypatch, *args)
    assert [(r["test"], r["draft_branches"]) for r in recs] == [("pp16", None), ("tg8", 1),
                                                                ("tg8", 3)]  # fmt: skip
    linear, tree = recs[1:]
    assert tree["accepted_tokens"] >= linear["accepted_tokens"]
    rc, out, err = llm(capsys, monkeypatch, "bench", *args, "--no-warmup", "-r", 1)
    assert rc == 0, err
    head = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    assert head[5:8] == ["mtp", "draft", "branches"]
    rc, _, err = llm(capsys, monkeypatch, "bench", "-m", tiny["step35"], "--draft-branches", "2")
    assert rc == 1 and "--draft-branches shapes drafting: it needs --mtp 1 or --spec" in err


def test_kv_type_and_depth_sweep(tiny, capsys, monkeypatch):
    args = ["-m", tiny["gemma3"], "-p", 8, "-n", 4, "-r", 1, "-d", "0,8", "--no-warmup"]
    recs, _ = bench_json(capsys, monkeypatch, *args, "-ctk", "f16,q8_0", "-ctv", "q4_0")
    got = [(r["type_k"], r["type_v"], r["test"]) for r in recs]
    assert got == [
        (k, "q4_0", t) for k in ("f16", "q8_0") for t in ("pp8", "tg4", "pp8 @ d8", "tg4 @ d8")
    ]
    assert {r["n_depth"] for r in recs} == {0, 8}
    rc, out, err = llm(capsys, monkeypatch, "bench", *args, "-ctk", "f16,q8_0")
    assert rc == 0, err
    head = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    assert "type_k" in head and "type_v" not in head and "tg4 @ d8" in out


def test_prompt_file_gives_real_text_tg_rows(tiny, capsys, monkeypatch):
    f = tiny["dir"] / "prompts.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.\n\nA second paragraph, a prompt.\n")
    recs, _ = bench_json(capsys, monkeypatch, "-m", tiny["llama"], *FAST, "--prompt-file", f)
    assert [r["gen_input"] for r in recs] == ["random", "file"]
    assert recs[1]["prompt_file"] == str(f) and recs[0]["prompt_file"] is None
    rc, out, err = llm(capsys, monkeypatch, "bench", "-m", tiny["llama"], "-p", 0, "-n", 4,
                       "-r", 1, "--prompt-file", f)  # fmt: skip
    assert rc == 0 and "--prompt-file" in out and "(2 prompts" in out, err


def test_text_context_and_plan_order(tiny):
    from llmkit.core.models.loader import load_model
    from llmkit.core.tokenizer import load_tokenizer

    lm = load_model(tiny["llama"])
    tok = load_tokenizer(lm.metadata)
    s = Session(lm, tok, ["one two three", "four five"])
    first = tok.encode("one two three")  # BOS + the prompt
    assert s.text_context(0, 0) == first and s.text_context(2, 0) == first
    assert s.text_context(1, 0) == tok.encode("four five")
    deep = s.text_context(1, 6)  # BOS, 5 tokens of the set's text, then the prompt
    assert deep[0] == tok.bos_id and deep[1:6] == s.filler[:5] and deep[6:] == s.texts[1]
    assert len(BUILTIN_PROMPTS) >= 3 and all(len(p) > 60 for p in BUILTIN_PROMPTS)

    p = BenchParams(models=["a", "b"], n_prompt=[16], n_gen=[8], mtp=[0, 1], draft=[1, 2])
    names = [(i.model_idx, i.test, i.mtp, i.draft) for i in rows(p)]
    assert names[:4] == [(0, "pp16", 0, None), (0, "tg8", 0, None), (0, "tg8", 1, 1),
                         (0, "tg8", 1, 2)]  # fmt: skip
    groups = [(i.model_idx, i.mtp) for i in plan(p)]
    assert groups == sorted(groups)  # one model load per (model, MTP on/off)


def test_every_repetition_gets_a_new_cache(tiny, monkeypatch):
    from llmkit.core.bench.runner import run_bench
    from llmkit.core.lean.load import LeanLoaded
    from llmkit.core.models.loader import LoadedModel

    calls = []
    for cls in (LoadedModel, LeanLoaded):  # the torch model, or the torch-free runtime's

        def counting(self, n_ctx, *a, _orig=cls.new_cache, **k):
            calls.append(n_ctx)
            return _orig(self, n_ctx, *a, **k)

        monkeypatch.setattr(cls, "new_cache", counting)
    threads = torch.get_num_threads()
    p = BenchParams(models=["x"], n_prompt=[8], n_gen=[4], n_depth=[3], reps=2, threads=[1])
    recs = run_bench(p, [tiny["llama"]], {})
    assert torch.get_num_threads() == threads  # the -t value does not leak out
    assert [r["test"] for r in recs] == ["pp8 @ d3", "tg4 @ d3"]
    # one probe of the KV types, then warm-up + 2 repetitions per test, each on a fresh cache
    assert len(calls) == 1 + 2 * 3 and calls[1:4] == [12, 12, 12]


def test_formatting_helpers():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample stddev (n - 1)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert _size(235.16 * 2**20) == "235.16 MiB" and _size(3 * 2**30) == "3.00 GiB"
    assert _params(268_098_176) == "268.10 M" and _params(6.74e9) == "6.74 B"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", -1], "-p values must be >= 0, got -1"),
        (["-r", 0], "-r must be >= 1"),
        (["-p", "16,abc"], "-p: 'abc' is not an integer"),
        (["-p", 0, "-n", 0], "nothing to measure"),
        (["-t", 0], "-t values must be >= 1"),
        (["-ctk", "q3"], "-ctk: unknown cache type 'q3'"),
        (["-ctv", "f16,q5"], "-ctv: unknown cache type 'q5'"),
        (["-o", "xml"], "-o: unknown output format 'xml'"),
        (["--mtp", 2], "--mtp values must be 0 or 1"),
        (["--mtp", 1], "llama.gguf has no NextN (MTP) blocks"),
        (["--draft", 2], "--draft sets the draft length: it needs --mtp 1 or --spec"),
        (["--draft-p-min", 0.5], "--draft-p-min gates drafting: it needs --mtp 1 or --spec"),
        (["--spec", "medusa"], "--spec: unknown drafter 'medusa'"),
        (["--n-layer-exit", 1], "--n-layer-exit sets the early-exit rows' layers"),
        (["--spec", "early-exit", "--n-layer-exit", "0"], "--n-layer-exit values must be >= 1"),
        (["--spec", "early-exit", "--n-layer-exit", 2], "--n-layer-exit must be between 1 and 1"),
        (["--spec", "early-exit", "--draft", "2,17"], "--draft must be between 1 and 16"),
        (["--spec", "mtp"], "llama.gguf has no NextN (MTP) blocks"),
        (["--draft-p-min", "x", "--mtp", 1], "--draft-p-min: 'x' is not a number"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--prompt-file", "/nonexistent/p.txt"], "cannot read --prompt-file"),
        (["-m", "/nonexistent/model.gguf"], "model file not found: /nonexistent/model.gguf"),
    ],
)
def test_bad_flags_give_one_line_errors(tiny, capsys, monkeypatch, args, message):
    if "-m" not in args:
        args = ["-m", tiny["llama"], *args]
    rc, out, err = llm(capsys, monkeypatch, "bench", *FAST, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith("error: ") and "Traceback" not in err and out == ""


def test_model_specific_errors(tiny, capsys, monkeypatch):
    empty = tiny["dir"] / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["-m", tiny["no_nextn"], "--mtp", "0,1"], "has no NextN (MTP) blocks"),
        (["-m", tiny["step35"], "--mtp", 1, "--draft", "0"], "--draft values must be >= 1"),
        (["-m", tiny["step35"], "--mtp", 1, "--draft", "2,4"], "--draft must be between 1 and 3"),
        (["-m", tiny["step35"], "-ctk", "q8_0"], "multiple of 32"),  # head dim 16
        (["-m", tiny["llama"], "--prompt-file", empty], "no text in it"),
    ]
    for args, message in cases:
        rc, out, err = llm(capsys, monkeypatch, "bench", *FAST, *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1 and message in lines[0], (args, err)
