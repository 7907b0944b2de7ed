"""Speculative decoding: the acceptance rule (exact greedy, exact distribution when sampling) and,
on tiny step35 models with NextN blocks, lossless output, counters, KV filtering and bad input."""

import pytest
import torch

from cli_run import llm as run_llm
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import accept
from llmkit.errors import LlmkitError

V = 6


def test_greedy_acceptance_counts_matching_prefix():
    s = Sampler(SamplerParams(temp=0))
    logits = torch.full((4, V), -5.0)
    for row, tok in enumerate([2, 3, 1, 5]):  # target argmax per verify row
        logits[row, tok] = 5.0
    assert accept(s, logits, [2, 3, 1], [None] * 3, []) == (3, 5)  # all accepted + bonus
    assert accept(s, logits, [2, 4, 1], [None] * 3, []) == (1, 3)  # stops at the mismatch
    assert accept(s, logits, [0, 3, 1], [None] * 3, []) == (0, 2)


def test_acceptance_rejects_non_finite_rows_it_reads():
    """A NaN / inf in a verify row the rule reads is an error naming the cause (never sampled
    from); a row after the first rejection is not read."""
    s = Sampler(SamplerParams(temp=0))
    logits = torch.zeros(3, V)
    logits[0, 2] = logits[1, 4] = 5.0
    logits[2, 0] = float("nan")
    assert accept(s, logits, [1, 4], [None] * 2, []) == (0, 2)  # row 2 never read
    for bad in (float("nan"), float("inf"), float("-inf")):
        logits[1, 3] = bad
        with pytest.raises(LlmkitError, match="non-finite logits"):
            accept(s, logits, [2, 4], [None] * 2, [])


def test_rejection_sampling_reproduces_the_target_distribution():
    # target p (row 0) and a deliberately different draft q: the first emitted token must follow p
    params = SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    s = Sampler(params)
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0], [0.0] * V])
    p = torch.softmax(logits[0], -1)
    q = torch.softmax(torch.tensor([2.5, 0.0, 0.5, -1.0, 1.0, 0.0]), -1).numpy()  # as drafts give
    n, counts, accepted = 20000, torch.zeros(V), 0
    for _ in range(n):
        d = s.draw(q)
        n_acc, nxt = accept(s, logits, [d], [q], [])
        counts[d if n_acc == 1 else nxt] += 1
        accepted += n_acc
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25, (counts, expected)  # 5 degrees of freedom: p-value ~ 1e-4
    # acceptance is sum_x min(p(x), q(x)): above the sample-and-compare rule's sum_x p(x) q(x)
    rate = accepted / n
    q = torch.from_numpy(q)
    assert abs(rate - float(torch.minimum(p, q).sum())) < 0.02
    assert rate > float((p * q).sum()) + 0.1


# -- end to end on tiny step35 models ---------------------------------------------------------
from llmkit.core.decode.drafter import MTPDrafter  # noqa: E402
from llmkit.core.decode.loop import GenStats, Speculation, generate  # noqa: E402
from llmkit.core.decode.sampling import make_sampler  # noqa: E402
from llmkit.core.decode.speculative import SpecConfig, SpecStats  # noqa: E402
from llmkit.core.models.loader import load_model  # noqa: E402
from tiny_step35 import write_tiny_step35  # noqa: E402

N_CTX, MARGIN = 160, 8  # rings of window + 8 slots: they wrap many times in these runs
PROMPTS = [
    [1, 270, 5, 9, 100, 200, 33, 7],
    [1, 300, 301, 302],
    [1, 17, 44, 260, 261, 9, 88, 140, 12, 5],
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("s35")
    out = {}
    for lay in ("full", "trunk", "mtp"):
        out[lay] = write_tiny_step35(d / f"{lay}.gguf", seed=4, layout=lay, draft_noise=0.2)
    out["hd32"] = write_tiny_step35(d / "hd32.gguf", seed=5, head_dim=32, draft_noise=0.2)
    out["single"] = write_tiny_step35(d / "single.gguf", seed=4, n_nextn=1, draft_noise=0.2)
    out["other"] = write_tiny_step35(d / "other.gguf", seed=4, layout="mtp", n_embd=32)
    out["dir"] = d
    return out


def _plain(lm, prompt, n, kv="f16"):
    cache = lm.new_cache(N_CTX, MARGIN, kv, kv)
    return list(generate(lm.model, cache, prompt, make_sampler(SamplerParams(temp=0)), n))


def _spec(lm, prompt, n, k, kv="f16", params=None, branches=1, p_min=0.0):
    cache = lm.new_cache(N_CTX, MARGIN, kv, kv)
    mtp = MTPDrafter(lm.model.mtp, N_CTX, MARGIN, kv, kv)
    cfg, spec, gen = SpecConfig(k, p_min, branches), SpecStats(k, branches=branches), GenStats()
    sampler = Sampler(params or SamplerParams(temp=0))
    cfg.check(mtp.max_draft, "test", cache.attn_kernel)
    cfg.check_sampling(sampler.greedy)  # what the caller that builds the config checks
    out = list(
        generate(lm.model, cache, prompt, sampler, n, stats=gen, spec=Speculation(mtp, cfg, spec))
    )
    spec.rounds = gen.decode_steps  # verification rounds, including ones with nothing to draft
    return out, spec, mtp


@pytest.mark.parametrize(
    "name, kv", [("full", "f16"), ("hd32", "q8_0"), ("hd32", "f16"), ("single", "f16")]
)
def test_greedy_mtp_is_lossless(files, name, kv):
    lm = load_model(files[name], mtp=True)
    outcomes = set()
    for prompt in PROMPTS:
        base = _plain(lm, prompt, 60, kv)
        for k in (1, 2, 3):
            out, spec, _ = _spec(lm, prompt, 60, k, kv)
            assert out == base, (name, kv, prompt, k)
            if k == 3:
                outcomes |= {spec.accepted_tokens > 0, spec.accepted_tokens < spec.draft_tokens}
    assert outcomes == {True, False} or outcomes == {
        True
    }  # drafts were accepted, and some rejected


def test_sidecar_layout_equals_full_file(files):
    full = load_model(files["full"], mtp=True)
    split = load_model(files["trunk"], mtp=True, draft_path=files["mtp"])
    for prompt in PROMPTS[:2]:
        a, sa, _ = _spec(full, prompt, 40, 3)
        b, sb, _ = _spec(split, prompt, 40, 3)
        assert a == b and sa.accepted_per_position == sb.accepted_per_position


def test_counters_add_up_and_all_paths_occur(files):
    lm = load_model(files["full"], mtp=True)
    full_accept = partial = reject = 0
    for prompt in PROMPTS:
        out, spec, _ = _spec(lm, prompt, 64, 3)
        d = spec.to_dict(len(out))
        assert spec.accepted_tokens <= spec.draft_tokens
        per = spec.accepted_per_position
        assert all(a >= b for a, b in zip(per, per[1:])) and sum(per) == spec.accepted_tokens
        assert d["mean_accepted_length"] == pytest.approx(1 + spec.accepted_tokens / spec.drafts)
        # one target token per round plus the accepted drafts (plus the first token from the prompt);
        # a round drafts nothing only when a single token remains to generate
        assert len(out) == 1 + spec.rounds + spec.accepted_tokens
        assert spec.drafts <= spec.rounds <= spec.drafts + 1
        full_accept += per[2]
        partial += per[0] - per[2]
        reject += spec.drafts - per[0]
    assert full_accept and partial and reject


def test_kv_filter(files):
    plain = load_model(files["full"])
    n_main = plain.config.n_layer
    assert not [
        n for n in plain.tensors if n.startswith(tuple(f"blk.{i}." for i in range(n_main, 7)))
    ]
    assert sorted(plain.model.kv_layout()) == list(range(n_main))
    lm = load_model(files["full"], mtp=True)
    mtp = MTPDrafter(lm.model.mtp, N_CTX, MARGIN)
    assert mtp.plan()["layers"] == list(range(n_main, lm.config.n_layer_all))
    assert sorted(lm.new_cache(N_CTX).plan()["layers"]) == list(range(n_main))


def test_sampling_with_mtp_is_exact_in_distribution(files):
    # top-k 2 makes the first two tokens a 4-outcome space whose exact probabilities we compute
    lm = load_model(files["full"], mtp=True, kernels="torch")
    prompt = PROMPTS[0]
    base = SamplerParams(temp=1.0, top_k=2, top_p=1.0, min_p=0.0)

    def probs(ids):
        logits = lm.model.forward(torch.tensor(ids), lm.new_cache(N_CTX, MARGIN)).logits[0]
        v, i = logits.topk(2)
        return dict(zip(i.tolist(), torch.softmax(v, 0).tolist()))

    exact = {}
    for t1, p1 in probs(prompt).items():
        for t2, p2 in probs(prompt + [t1]).items():
            exact[(t1, t2)] = p1 * p2
    n, counts = 400, dict.fromkeys(exact, 0)
    for seed in range(n):
        out, _, _ = _spec(lm, prompt, 2, 1, params=SamplerParams(**{**base.__dict__, "seed": seed}))
        counts[tuple(out)] += 1
    chi2 = sum((counts[o] - n * p) ** 2 / (n * p) for o, p in exact.items())
    assert chi2 < 16.3, (counts, exact)  # 3 degrees of freedom: p-value ~ 1e-3


def test_cli_mtp_stats_and_bad_input(files, capsys, monkeypatch, tmp_path):
    import json

    def llm(*args):
        return run_llm(capsys, monkeypatch, *args)

    base = [
        "run",
        "-m",
        files["full"],
        "-p",
        "the cat sat",
        "-n",
        40,
        "--temp",
        0,
        "--ignore-eos",
        "-c",
        160,
    ]
    stats = tmp_path / "s.json"
    rc, plain, err = llm(*base)
    assert rc == 0, err
    rc, spec, err = llm(*base, "--mtp", "--draft", 3, "--stats-json", stats, "-ctkd", "q8_0")
    assert rc != 0 and "multiple of 32" in err  # head_dim 16: a clear error, not a crash
    rc, spec, err = llm(*base, "--mtp", "--draft", 3, "--stats-json", stats, "--verbose")
    assert rc == 0 and spec == plain, err
    assert "kv cache (mtp)" in err and "speculative (mtp, draft 3)" in err
    s = json.loads(stats.read_text())
    sp = s["speculative"]
    assert sp["type"] == "mtp" and sp["draft_max"] == 3 and len(sp["accepted_per_position"]) == 3
    assert s["memory"]["kv"]["mtp"]["layers"] == [4, 5, 6] and s["memory"]["kv"]["main"][
        "layers"
    ] == [0, 1, 2, 3]
    for key in (
        "drafts",
        "draft_tokens",
        "accepted_tokens",
        "acceptance_rate",
        "mean_accepted_length",
        "decode_tok_per_s",
        "decode_tok_per_s_without_drafting",
    ):
        assert key in sp
    rc, out, err = llm(
        "run",
        "-m",
        files["trunk"],
        "-md",
        files["mtp"],
        "-p",
        "the cat sat",
        "-n",
        40,
        "--temp",
        0,
        "--ignore-eos",
        "-c",
        160,
        "--mtp",
    )
    assert rc == 0 and out == plain, err
    bad = [
        (["--mtp", "--draft", 0], "--draft must be between 1 and 3"),
        (["--mtp", "--draft", 4], "--draft must be between 1 and 3"),
        (["-md", files["mtp"]], "needs --mtp"),
        (["--mtp", "-md", files["other"]], "does not belong to this model"),
        (["--moe-n-expert", 0], "--moe-n-expert"),
        (["--moe-n-expert", 9], "--moe-n-expert"),
        (["--mtp", "--draft-p-min", 2], "--draft-p-min"),
        (["--mtp", "--draft-branches", 0], "--draft-branches must be >= 1"),
        (["--mtp", "--draft-branches", 2, "--temp", 0.7], "needs --mtp and greedy decoding"),
    ]
    for extra, msg in bad:
        rc, out, err = llm(*base, *extra)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1 and msg in lines[0], (extra, err)
    trunk_only = write_tiny_step35(tmp_path / "t.gguf", seed=4, n_nextn=0)
    rc, out, err = llm("run", "-m", trunk_only, "-p", "x", "--mtp")
    assert rc == 1 and "no NextN (MTP) blocks" in err


def test_draft_p_min_stops_drafting(files):
    lm = load_model(files["full"], mtp=True)
    out, spec, _ = _spec(lm, PROMPTS[0], 30, 3, p_min=1.0)
    assert out == _plain(lm, PROMPTS[0], 30) and spec.draft_tokens == 0


def test_chat_turns_with_mtp_match_plain_chat(files, capsys, monkeypatch):
    import io
    import sys

    from llmkit.cli.app import main

    outs = []
    for extra in ([], ["--mtp"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\nthe dog sat\n"))
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "llm",
                "run",
                "-m",
                str(files["full"]),
                "-cnv",
                "-n",
                "12",
                "--temp",
                "0",
                "--ignore-eos",
                "-c",
                "160",
                *extra,
            ],
        )
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        assert e.value.code == 0, out.err
        outs.append(out.out)
    assert outs[0] == outs[1]


def test_n_predict_limits_match_plain_generation(files):
    lm = load_model(files["full"], mtp=True)
    for n in (0, 1, 2):
        assert _spec(lm, PROMPTS[0], n, 3)[0] == _plain(lm, PROMPTS[0], n)


@pytest.mark.parametrize(
    "name, kv, k",
    [("full", "f16", 1), ("hd32", "q8_0", 3), ("hd32", "f16", 2), ("single", "f16", 3)],
)
def test_draft_trees_are_lossless_and_accept_alternatives(files, name, kv, k):
    """Alternatives at the first draft position, verified as siblings in one batch: the output is
    still the plain greedy output (through sliding rings that wrap), and some rounds are won by an
    alternative the linear chain would have lost."""
    lm = load_model(files[name], mtp=True)
    alt = linear_acc = tree_acc = 0
    for prompt in PROMPTS:
        base = _plain(lm, prompt, 60, kv)
        out, spec, _ = _spec(lm, prompt, 60, k, kv, branches=3)
        assert out == base, (name, prompt, k)
        alt += spec.accepted_alternatives
        tree_acc += spec.accepted_per_position[0] / spec.drafts
        lin = _spec(lm, prompt, 60, k, kv)[1]
        linear_acc += lin.accepted_per_position[0] / lin.drafts
    assert alt > 0 and tree_acc > linear_acc


def test_draft_trees_need_greedy_decoding(files):
    lm = load_model(files["single"], mtp=True)
    with pytest.raises(LlmkitError, match="greedy"):
        _spec(lm, PROMPTS[0], 8, 1, params=SamplerParams(temp=0.8, seed=1), branches=2)


@pytest.mark.parametrize("name, branches", [("full", 1), ("single", 1), ("single", 3)])
def test_mtp_cache_after_rounds_equals_a_fresh_mirror(files, name, branches):
    """Drafting keeps each round's first row (token `last`, the target hidden) as the mirrored
    row: after many rounds the MTP caches hold what mirroring every accepted token would write."""
    lm = load_model(files[name], mtp=True)
    prompt = PROMPTS[0]
    out, spec, mtp = _spec(lm, prompt, 50, 3, branches=branches)
    assert spec.drafts > 0 and 0 < spec.accepted_tokens < spec.draft_tokens
    ids = torch.tensor(prompt + out)[: mtp.n_past]
    cache, fresh = lm.new_cache(N_CTX, MARGIN), MTPDrafter(lm.model.mtp, N_CTX, MARGIN)
    for s in range(0, len(ids), MARGIN):  # chunks that fit the sliding-window rings
        _, h = lm.model.forward(ids[s : s + MARGIN], cache, "all")
        fresh.observe(s, ids[s : s + MARGIN], h)
    pending = mtp.state.pending_h
    torch.testing.assert_close(pending, fresh.state.pending_h, rtol=1e-3, atol=1e-3)
    for j in range(lm.model.mtp.n_heads):
        probe = (torch.tensor([out[-1]]), pending[None])
        a, _ = lm.model.mtp.forward(j, *probe, mtp.caches[j], "last")
        b, _ = lm.model.mtp.forward(j, *probe, fresh.caches[j], "last")
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
