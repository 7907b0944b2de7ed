"""Early exit (`--n-layer-exit`, `--spec early-exit`): the first L layers as a smaller model and as
a drafter over the target's own KV; greedy output identical to plain greedy, also when sliding
rings wrap and roll back."""

import json

import pytest
import torch

from cli_run import llm as run_llm
from llmkit.core.api import LLM
from llmkit.core.cache.kv import KVCache
from llmkit.core.decode.early_exit import EarlyExitDrafter, ExitModel, early_exit_spec
from llmkit.core.decode.loop import GenStats, generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig
from llmkit.core.models.common import rope_rows
from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError
from tiny_models import write_tiny_gemma3, write_tiny_llama

PROMPTS = ([1, 5, 6, 7], [2, 40, 41, 42, 43, 44, 45, 46, 47])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ee")
    return {
        "llama": load_model(write_tiny_llama(d / "l.gguf", n_layer=4, tied=False)),
        "gemma3": load_model(write_tiny_gemma3(d / "g.gguf", window=8)),
    }


def _plain(lm, cache, prompt, n):
    return list(generate(lm.model, cache, prompt, Sampler(SamplerParams(temp=0)), n))


def _spec(lm, cache, prompt, n, L, k, branches=1):
    spec = early_exit_spec(lm.model, cache, L, SpecConfig(draft=k, branches=branches))
    gen = GenStats()
    out = list(generate(lm.model, cache, prompt, Sampler(SamplerParams(temp=0)), n, stats=gen,
                        spec=spec))  # fmt: skip
    return out, spec.stats


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_early_exit_is_lossless_on_tiny_models(tiny, arch):
    lm = tiny[arch]
    n_layer = lm.config.n_layer
    accepted = rejected = False
    for prompt in PROMPTS:
        # margin 8: the gemma3 rings (window 8) hold 16 slots and wrap many times in 60 tokens
        base = _plain(lm, lm.new_cache(96, margin=8), prompt, 60)
        for L in (1, n_layer - 1):
            for k in (1, 2, 3):
                out, st = _spec(lm, lm.new_cache(96, margin=8), prompt, 60, L, k)
                assert out == base, (arch, prompt, L, k)
                assert st.drafts > 0 and sum(st.accepted_per_position) == st.accepted_tokens
                accepted |= st.accepted_tokens > 0
                rejected |= st.accepted_tokens < st.draft_tokens
    assert accepted
    # the untied llama disagrees with its early exit now and then (the rejected rows roll back);
    # the tied tiny gemma3 repeats its last token, which every exit predicts
    assert rejected or arch == "gemma3"


def test_draft_trees_are_lossless(tiny):
    lm = tiny["llama"]
    base = _plain(lm, lm.new_cache(96, margin=8), PROMPTS[1], 40)
    out, st = _spec(lm, lm.new_cache(96, margin=8), PROMPTS[1], 40, 3, 2, branches=3)
    assert out == base and st.drafts > 0


def test_draft_leaves_the_cache_as_it_was(tiny):
    lm = tiny["gemma3"]
    cache = lm.new_cache(64, margin=8)
    _plain(lm, cache, list(range(3, 30)), 1)  # 27 positions: the window-8 rings have wrapped
    n = cache.n_past
    before = {g: (x.slot_pos.clone(), {il: t.clone() for il, t in x.k.items()})
              for g, x in cache.groups.items()}  # fmt: skip
    d = EarlyExitDrafter(lm.model, cache, 3)
    draft = d.draft(7, 4, Sampler(SamplerParams(temp=0)).pick_draft)
    assert len(draft.tokens) == 4 and cache.n_past == n
    for g, x in cache.groups.items():
        pos0, k0 = before[g]
        # every position a later row can attend is still there; nothing at or after n remains
        need = pos0 >= (n - x.window if x.window else 0)
        assert torch.equal(x.slot_pos[need], pos0[need]) and bool((x.slot_pos < n).all())
        assert (x.slot_pos >= 0).sum() < (pos0 >= 0).sum() or x.window is None  # ring reused
        for il, t in x.k.items():  # layers >= 3 are never written; the others only at free slots
            assert torch.equal(t[:, need], k0[il][:, need])
            assert torch.equal(t, k0[il]) or il < 3


def test_exit_model_runs_the_first_layers(tiny):
    lm = tiny["llama"]
    ids = torch.tensor([1, 5, 6, 7])
    full = lm.model.forward(ids, lm.new_cache(16, margin=8), logits="all").logits
    assert ExitModel(lm.model, 4).forward(ids, lm.new_cache(16, margin=8), "all").logits.equal(full)
    m2 = ExitModel(lm.model, 2)
    assert sorted(m2.kv_layout()) == [0, 1]
    cache = KVCache(m2.kv_layout(), 16, 8, device=lm.backend.device)
    two = m2.forward(ids, cache, "all")
    assert not torch.allclose(two.logits, full)  # the exit changes the model
    # = the full model's blocks 0, 1 by hand, then norm and head
    x = lm.model.embed(ids)
    ref_cache = lm.new_cache(16, margin=8)
    pos = ref_cache.positions(4)
    ref_cache.begin(pos)
    for blk in lm.model.blocks[:2]:
        x = blk(x, rope_rows(blk.rope, pos, {}), ref_cache)
    torch.testing.assert_close(two.hidden, x)
    torch.testing.assert_close(two.logits, lm.model.lm_logits(x))


def test_bad_exit_layers(tiny):
    lm = tiny["llama"]
    for L in (0, 5):
        with pytest.raises(LlmkitError, match="--n-layer-exit must be between 1 and 4"):
            ExitModel(lm.model, L)
    with pytest.raises(LlmkitError, match="between 1 and 3"):  # drafting needs fewer layers
        EarlyExitDrafter(lm.model, lm.new_cache(16, margin=8), 4)


def test_cli_early_exit_stats_and_errors(tiny, tmp_path, capsys, monkeypatch):
    path = write_tiny_llama(tmp_path / "l.gguf", n_layer=4, tied=False)
    args = ["-m", path, "-p", "hello", "-n", "12", "--temp", "0", "--ignore-eos"]
    rc, plain, _ = run_llm(capsys, monkeypatch, "run", *args)
    assert rc in (0, None)
    js = tmp_path / "s.json"
    rc, out, err = run_llm(capsys, monkeypatch, "run", *args, "--spec", "early-exit",
                           "--n-layer-exit", "2", "--draft", "2", "--stats-json", js)  # fmt: skip
    assert rc in (0, None) and out == plain
    assert "speculative (early-exit, draft 2)" in err and "per position [" in err
    s = json.loads(js.read_text())
    assert s["speculative"]["type"] == "early-exit"
    assert len(s["speculative"]["acceptance_per_position"]) == 2
    assert s["memory"]["kv"]["early-exit"]["bytes"] == 0  # it shares the target's KV
    rc, _, err = run_llm(capsys, monkeypatch, "run", *args, "--spec", "medusa")
    assert rc == 1 and "unknown --spec 'medusa'" in err
    rc, _, err = run_llm(capsys, monkeypatch, "run", *args, "--spec", "early-exit",
                         "--n-layer-exit", "4")  # fmt: skip
    assert rc == 1 and "--n-layer-exit must be between 1 and 3" in err
    rc, out, _ = run_llm(capsys, monkeypatch, "run", *args, "--n-layer-exit", "2")
    assert rc in (0, None) and out != plain  # a 2-layer model writes something else


def _llm_lossless(path, L, n=32, **kw):
    prompt = "The history of the city began"
    plain = LLM.load(path, n_ctx=256, **kw)
    base = plain.generate(prompt, n_predict=n, temp=0, ignore_eos=True)
    for k in (1, 3):
        lm = LLM.load(path, n_ctx=256, spec="early-exit", n_layer_exit=L, draft=k, **kw)
        assert lm.generate(prompt, n_predict=n, temp=0, ignore_eos=True) == base, (L, k)
        d = lm.stats_dict()["speculative"]
        assert d["type"] == "early-exit" and d["drafts"] > 0


def test_greedy_early_exit_is_lossless_on_smollm(smollm_gguf):
    _llm_lossless(smollm_gguf, 20)


def test_greedy_early_exit_is_lossless_on_gemma(gemma_gguf):
    _llm_lossless(gemma_gguf, 12)


def test_gemma_rollback_across_a_wrapping_window(gemma_gguf):
    lm = load_model(gemma_gguf)
    lm.model.config.sliding_window = 24  # small rings: 24 + margin 8 slots wrap every 32 tokens
    prompt = list(range(1000, 1020))
    base = _plain(lm, lm.new_cache(160, margin=8), prompt, 110)
    out, st = _spec(lm, lm.new_cache(160, margin=8), prompt, 110, 12, 3)
    assert out == base
    assert 0 < st.accepted_tokens < st.draft_tokens
    assert lm.new_cache(160, margin=8).groups["swa24"].capacity == 32
