"""Samplers: greedy, filters in llama.cpp's order, repeat penalty, seeded reproducibility."""

import pytest
import torch

from llmkit.core.decode.sampling import (
    SamplerParams,
    apply_repeat_penalty,
    filtered_probs,
    make_sampler,
)
from llmkit.errors import LlmkitError

LOGITS = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0, 0.0])


def test_greedy_is_argmax():
    assert make_sampler(SamplerParams(temp=0))(LOGITS, []) == 3


def test_top_k_top_p_min_p():
    ids, probs = filtered_probs(LOGITS, SamplerParams(temp=1.0, top_k=3, top_p=1.0, min_p=0.0))
    assert ids.tolist() == [3, 0, 1] and probs.sum().item() == pytest.approx(1.0)
    # top-p keeps the smallest prefix reaching the mass: p(3) ~ 0.61, p(3)+p(0) ~ 0.84
    ids, _ = filtered_probs(LOGITS, SamplerParams(temp=1.0, top_k=0, top_p=0.7, min_p=0.0))
    assert ids.tolist() == [3, 0]
    ids, _ = filtered_probs(LOGITS, SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.3))
    assert ids.tolist() == [3, 0]  # p >= 0.3 * p_max


def test_temperature_sharpens():
    _, hot = filtered_probs(LOGITS, SamplerParams(temp=2.0, top_k=0, top_p=1.0, min_p=0.0))
    _, cold = filtered_probs(LOGITS, SamplerParams(temp=0.5, top_k=0, top_p=1.0, min_p=0.0))
    assert cold[0] > hot[0]


def test_repeat_penalty_rule():
    out = apply_repeat_penalty(LOGITS, [3, 4, 3], 2.0)
    assert out[3].item() == 1.5 and out[4].item() == -2.0 and out[0].item() == 2.0


def test_same_seed_same_tokens():
    p = SamplerParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    s1, s2 = make_sampler(p), make_sampler(p)
    a = [s1(LOGITS, []) for _ in range(50)]
    b = [s2(LOGITS, []) for _ in range(50)]
    assert a == b and len(set(a)) > 1


def test_sampling_follows_distribution():
    s = make_sampler(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7))
    counts = torch.bincount(
        torch.tensor([s(LOGITS, []) for _ in range(4000)]), minlength=6
    ).double()
    expected = torch.softmax(LOGITS.double(), 0) * 4000
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25  # 5 degrees of freedom: p ~ 1e-4


@pytest.mark.parametrize(
    "kw", [{"top_k": -1}, {"top_p": 1.5}, {"min_p": 1.5}, {"repeat_penalty": 0}]
)
def test_bad_params(kw):
    with pytest.raises(LlmkitError):
        make_sampler(SamplerParams(**kw))


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"temp": float("nan")}, "--temp"),
        ({"temp": float("inf")}, "--temp"),
        ({"temp": -0.5}, "--temp"),
        ({"top_p": float("nan")}, "--top-p"),
        ({"top_p": -0.1}, "--top-p"),
        ({"min_p": float("nan")}, "--min-p"),
        ({"repeat_penalty": float("nan")}, "--repeat-penalty"),
        ({"repeat_penalty": float("inf")}, "--repeat-penalty"),
        ({"repeat_last_n": -2}, "--repeat-last-n"),
        ({"seed": 2**64}, "--seed"),
        ({"seed": 2**70}, "--seed"),
        ({"seed": -2}, "--seed"),
        ({"seed": True}, "--seed"),
        ({"top_k": 2.5}, "--top-k"),
    ],
)
def test_params_validate_themselves_naming_the_parameter(kw, name):
    with pytest.raises(LlmkitError, match=f"^{name} must be"):
        SamplerParams(**kw).validate()
    with pytest.raises(LlmkitError, match=f"^{name} must be"):
        make_sampler(SamplerParams(**kw))


def test_edge_values_are_accepted():
    for kw in ({"seed": 2**64 - 1}, {"seed": 0}, {"seed": -1}, {"top_p": 0.0}, {"temp": 0}):
        make_sampler(SamplerParams(**kw))(LOGITS, [])
    # top_p 0 keeps the most likely token only
    ids, _ = filtered_probs(LOGITS, SamplerParams(temp=1.0, top_k=0, top_p=0.0, min_p=0.0))
    assert ids.tolist() == [3]


def test_names_map_renames_the_parameter():
    with pytest.raises(LlmkitError, match="^'temperature' must be"):
        SamplerParams(temp=float("nan")).validate({"temp": "'temperature'"})


@pytest.mark.parametrize("args", [["--temp", "nan"], ["--temp", "-1"], ["--seed", str(2**70)]])
def test_llm_run_bad_sampling_flag_is_one_line(capsys, monkeypatch, args):
    from cli_run import llm

    rc, _, err = llm(capsys, monkeypatch, "run", "-m", "none.gguf", "-p", "hi", *args)
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert args[0] in err, err


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens():
    p = SamplerParams(temp=0, presence_penalty=0.5, frequency_penalty=0.25)
    s = make_sampler(p)
    s.n_prompt = 2  # history [0, 1] is the prompt: not penalised
    out = s.adjust(LOGITS, [0, 1, 3, 3, 4])
    assert out[3].item() == pytest.approx(3.0 - 2 * 0.25 - 0.5)
    assert out[4].item() == pytest.approx(-1.0 - 0.25 - 0.5)
    assert out[0].item() == 2.0 and out[1].item() == 1.0 and out[2].item() == 0.5


def test_penalties_change_the_greedy_choice():
    s = make_sampler(SamplerParams(temp=0, frequency_penalty=2.0))
    assert s(LOGITS, []) == 3 and s(LOGITS, [3]) == 0  # 3 - 2 = 1 < 2


def test_logit_bias_is_added_before_greedy_and_logprobs():
    s = make_sampler(SamplerParams(temp=0, logit_bias={3: -100.0, 5: 1.5}))
    z = s.adjust(LOGITS, [])
    assert z[3].item() == -97.0 and z[5].item() == 1.5
    assert s(LOGITS, []) == 0
    with pytest.raises(LlmkitError, match="below 6"):
        make_sampler(SamplerParams(logit_bias={6: 1.0})).adjust(LOGITS, [])


def test_minus_inf_bias_bans_a_token_greedy_and_sampled():
    top = make_sampler(SamplerParams(temp=0))(LOGITS, [])
    for temp in (0.0, 1.0):
        s = make_sampler(SamplerParams(temp=temp, seed=1, logit_bias={top: float("-inf")}))
        assert all(s(LOGITS, []) != top for _ in range(50))


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"presence_penalty": 2.5}, "--presence-penalty"),
        ({"frequency_penalty": float("nan")}, "--frequency-penalty"),
        ({"logit_bias": {1: 101.0}}, "--logit-bias"),
        ({"logit_bias": {1: float("inf")}}, "--logit-bias"),
        ({"logit_bias": {1: float("nan")}}, "--logit-bias"),
        ({"logit_bias": {-1: 1.0}}, "--logit-bias"),
        ({"logit_bias": {"1": 1.0}}, "--logit-bias"),
        ({"logit_bias": [1, 2]}, "--logit-bias"),
    ],
)
def test_penalty_and_bias_params_validate(kw, name):
    with pytest.raises(LlmkitError, match=name):
        SamplerParams(**kw).validate()


def test_top_k_is_exact_on_large_vocabularies_ties_and_masks():
    """The threshold shortcut (a bound from every 16th value) gives the exact k largest values,
    sorted, ties by the lower id unless the k-th value itself is tied; with a grammar's -inf
    mask, many ties or k above the size too."""
    import numpy as np

    from llmkit.core.decode.sampling import top_k

    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k = int(rng.integers(1, 300_000)), int(rng.integers(1, 80))
        z = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            z = np.round(z * 2).astype(np.float32)  # few distinct values: many ties
        if trial % 5 == 0:
            z[rng.random(n) < 0.99] = -np.inf  # a grammar mask
        vals, ids = top_k(z, k)
        kk = min(k, n)
        ref = np.lexsort((np.arange(n), -z))[:kk]
        assert np.array_equal(vals, z[ref]) and np.array_equal(z[ids], vals)
        assert len(set(ids.tolist())) == kk
        assert np.array_equal(np.lexsort((ids, -vals)), np.arange(kk))  # sorted, ties by id
        if kk == n or z[ref[-1]] != np.sort(z)[::-1][kk]:  # no tie at the k-th value
            assert np.array_equal(ids, ref)
