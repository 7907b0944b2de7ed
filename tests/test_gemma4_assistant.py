"""Gemma 4 MTP assistant: a tiny random transformers Gemma4AssistantForCausalLM converted with
`llm convert`, checked step by step against transformers (fp32) over the target's shared KV, and
used as the drafter of `llm run --mtp -md`: greedy output identical to plain greedy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_gemma4 import (
    IDS,
    _rel_rms,
    convert_cli,
    gemma4_tokenizer,
    randomize,
    text_config,
    write_hf_gemma4,
)

from llmkit.cli.app import main
from llmkit.core.decode.assistant import AssistantDrafter
from llmkit.core.decode.loop import Speculation, generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig, SpecStats
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.models.gemma4_assistant import load_assistant
from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError

pytest.importorskip("transformers")


def write_hf_assistant(d: Path, vocab: int, window: int, seed: int = 3, oracle=None):
    """A random assistant; with `oracle` (the target) an "echo" one: input = the target's hidden,
    blocks that add nothing, the target's head, so it drafts the token that hidden produced (the
    last sampled one) again and again: accepted exactly where the target repeats itself."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    d.mkdir(parents=True, exist_ok=True)
    assert gemma4_tokenizer(d) == vocab
    tc = text_config(
        vocab,
        hidden_size=64 if oracle is not None else 32,
        intermediate_size=48,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=3,
        use_double_wide_mlp=False,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        sliding_window=window,
        final_logit_softcapping=None,
    )
    cfg = Gemma4AssistantConfig(text_config=tc.to_dict(), backbone_hidden_size=64)
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    randomize(model, seed)
    if oracle is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(oracle.model.embed_tokens.weight)
            eye = torch.eye(64)
            model.pre_projection.weight.copy_(torch.cat([torch.zeros(64, 64), eye], 1))
            model.post_projection.weight.copy_(eye)
            model.model.norm.weight.fill_(1.0)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                layer.layer_scalar.fill_(1.0)
    model.save_pretrained(d)
    return model


def build(tmp_path, monkeypatch, window: int, oracle: bool = False):
    hf = write_hf_gemma4(tmp_path / "hf", sliding_window=window)
    asst = write_hf_assistant(
        tmp_path / "hfa", hf.config.vocab_size, window, oracle=hf if oracle else None
    )
    convert_cli(tmp_path / "hf", tmp_path / "m.gguf", monkeypatch)
    convert_cli(tmp_path / "hfa", tmp_path / "a.gguf", monkeypatch)
    return hf, asst, tmp_path / "m.gguf", tmp_path / "a.gguf"


def test_draft_steps_match_transformers(tmp_path, monkeypatch):
    # window 16 > the 10 cached tokens: both implementations see every key (they differ only at
    # the edge of the window, where verification decides anyway)
    hf, asst, m, a = build(tmp_path, monkeypatch, window=16)
    g = GGUFFile(a)
    assert g.architecture == "gemma4-assistant"
    assert g.metadata["gemma4-assistant.embedding_length_out"] == 64
    assert "blk.0.attn_k.weight" not in g.tensors and "nextn.pre_projection.weight" in g.tensors
    ids, n = IDS[:11], 10
    with torch.no_grad():
        out = hf.model(input_ids=torch.tensor([ids[:n]]), return_shared_kv_states=True)
        kv, h = out.shared_kv_states, out.last_hidden_state[:, -1:]
        tok, ref = torch.tensor([[ids[n]]]), []
        for _ in range(3):  # chained steps at the same position n
            emb = hf.model.embed_tokens(tok)
            o = asst(inputs_embeds=torch.cat([emb, h], -1), position_ids=torch.tensor([[n]]),
                     shared_kv_states=kv)  # fmt: skip
            ref.append((o.logits[0, -1], o.last_hidden_state[0, -1]))
            tok, h = o.logits.argmax(-1), o.last_hidden_state
    lm = load_model(m, kernels="torch")
    cache = lm.new_cache(64, 32, "f32", "f32")
    with torch.inference_mode():
        hid = lm.model.forward(torch.tensor(ids[:n]), cache, logits=None).hidden
        ours = load_assistant(a, lm.model)
        assert ours.src == [3, 3, 2]  # the target's last KV-owning sliding / full layers
        h, tok = ours.target_hidden(hid[-1:]), ids[n]
        for want_z, want_h in ref:
            z, h = ours.step(torch.tensor([tok]), h, n, cache)
            rz, rh = _rel_rms(z[0], want_z), _rel_rms(h[0], want_h)
            print(f"assistant step: logits rel RMS {rz:.2e}, h_next rel RMS {rh:.2e}")
            assert rz < 1e-4 and rh < 1e-4
            tok = int(want_z.argmax())
    assert cache.n_past == n  # the drafter wrote nothing


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_assistant_drafting_is_lossless(tmp_path, monkeypatch, kernels):
    _, _, m, a = build(tmp_path, monkeypatch, window=5, oracle=True)
    lm = load_model(m, kernels=kernels)
    pick = lambda logits, hist: int(logits.argmax())  # noqa: E731
    prompt, n = IDS[:7], 24
    plain = list(generate(lm.model, lm.new_cache(128, 16), prompt, pick, n_predict=n))
    assistant = load_assistant(a, lm.model)
    for k in (1, 2, 3, 4):
        cache = lm.new_cache(128, 16)
        stats = SpecStats(k)
        spec = Speculation(AssistantDrafter(assistant, cache), SpecConfig(k), stats)
        got = list(generate(lm.model, cache, prompt, Sampler(SamplerParams(temp=0.0)),
                            n_predict=n, n_ubatch=4, spec=spec))  # fmt: skip
        d = stats.to_dict(len(got))
        print(f"{kernels} draft {k}: acceptance {d}")
        assert got == plain
        assert stats.drafts > 0 and stats.accepted_tokens > 0
    # the echo assistant reads the post-norm hidden of the row that produced `last`
    cache = lm.new_cache(128, 16)
    drafter = AssistantDrafter(assistant, cache)
    greedy = Sampler(SamplerParams(temp=0.0))
    with torch.inference_mode():
        for p0 in (0, 4):
            h = lm.model.forward(torch.tensor(prompt[p0 : p0 + 4]), cache, logits=None).hidden
            drafter.observe(p0, torch.tensor(prompt[p0 : p0 + 4]), h)
        last = int(lm.model.lm_logits(h[-1:])[0].argmax())
    assert drafter.draft(last, 3, greedy.pick_draft).tokens == [last] * 3
    assert cache.n_past == 7


def test_llm_run_with_assistant(tmp_path, monkeypatch, capsys):
    _, _, m, a = build(tmp_path, monkeypatch, window=5)
    stats = tmp_path / "s.json"
    runs = {}
    for extra in ([], ["-md", str(a), "--mtp", "--draft", "3"]):
        argv = ["llm", "run", "-m", str(m), "-p", "the river", "-n", "20", "--temp", "0",
                "--ignore-eos", "--stats-json", str(stats), *extra]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code in (0, None), capsys.readouterr().err
        runs[bool(extra)] = json.loads(stats.read_text())
    assert runs[True]["tokens"] == runs[False]["tokens"] and len(runs[True]["tokens"]) == 20
    spec = runs[True]["speculative"]
    print("llm run --mtp -md assistant:", spec)
    assert spec["draft_tokens"] > 0


def test_assistant_refused_where_it_does_not_fit(tmp_path, monkeypatch):
    _, _, m, a = build(tmp_path, monkeypatch, window=5)
    with pytest.raises(LlmkitError, match="is a drafter"):
        load_model(a)
    with pytest.raises(LlmkitError, match="drafts for a gemma4 model only"):
        load_assistant(a, object())
    other = load_model(m)
    other.config.sliding_window = 9  # a target whose sliding layers differ
    with pytest.raises(LlmkitError, match="does not fit"):
        load_assistant(a, other.model)


def test_assistant_refuses_turbo_kv(tmp_path, monkeypatch):
    """Its Q-only attention reads the target's K/V as vectors: turbo codes are refused by name
    (a cache stand-in: the tiny model's head dims are below turbo's 64-value groups)."""
    from types import SimpleNamespace

    _, _, m, a = build(tmp_path, monkeypatch, window=5, oracle=False)
    assistant = load_assistant(a, load_model(m, kernels="torch").model)
    for tk, tv in (("turbo4", "f16"), ("f16", "turbo3")):
        with pytest.raises(LlmkitError, match=f"does not read {tk if tk != 'f16' else tv} KV"):
            AssistantDrafter(assistant, SimpleNamespace(type_k=tk, type_v=tv))


def test_llm_bench_with_assistant(tmp_path, monkeypatch, capsys):
    """`llm bench --mtp 0,1 --draft 1,2 -md assistant.gguf`: the MTP rows draft with the
    assistant, their greedy tokens are the plain row's, acceptance is measured."""
    _, _, m, a = build(tmp_path, monkeypatch, window=5, oracle=True)

    def bench(*extra):
        argv = ["llm", "bench", "-m", str(m), "-p", "0", "-n", "16", "-r", "1", "-t", "1",
                "--no-warmup", "-o", "json", *extra]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr()

    rc, out = bench("--mtp", "0,1", "--draft", "1,2", "-md", str(a))
    assert rc in (0, None), out.err
    recs = json.loads(out.out)
    assert [(r["test"], r["mtp"], r["n_draft"]) for r in recs] == [
        ("tg16", 0, None),
        ("tg16", 1, 1),
        ("tg16", 1, 2),
    ]
    for r in recs[1:]:
        print(f"bench -md assistant draft {r['n_draft']}: acceptance {r['acceptance_rate']:.3f}")
        assert r["lossless"] is True and r["drafts"] > 0 and r["accepted_tokens"] > 0
    rc, out = bench("-md", str(a))
    assert rc not in (0, None) and "needs --mtp 1" in out.err
    rc, out = bench("--mtp", "1", "--draft", "17", "-md", str(a))
    assert rc not in (0, None) and "--draft must be between 1 and 16" in out.err


def test_acceptance_matches_transformers_assisted_generation(tmp_path, monkeypatch, capsys):
    """transformers' own assisted generation (`generate(assistant_model=...)`, its
    SinglePositionMultiTokenCandidateGenerator, a constant number of drafts) against `llm run
    --mtp -md --draft N` on the same prompt: the same greedy tokens and acceptance.

    The assistant is the serving test's: echo-like, with a random output projection under a small
    post-attention norm, so its drafts depend on the KV it reads and are often, not always,
    accepted. After a partly rejected round, stock transformers still shows the drafter the first
    rejected draft's K/V at its own position (spec part 4.6); with the target's K/V cut to the
    committed n_past keys (llama.cpp's rule, ours) its drafts and acceptance are exactly ours.
    Pooled over N = 1..4, stock transformers' acceptance is within 0.05 of ours. The window (64)
    covers the whole sequence: once transformers' sliding cache evicts, it indexes the shared
    K/V by position though the tensor no longer starts at 0 (rejected drafts past it included)."""
    from transformers.generation import candidate_generator as cg

    from llmkit.core.tokenizer import load_tokenizer

    gen = getattr(cg, "SinglePositionMultiTokenCandidateGenerator", None)
    if gen is None:
        pytest.skip("this transformers has no Gemma 4 assistant candidate generator")
    hf, asst, m, a = build(tmp_path, monkeypatch, window=64, oracle=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in asst.model.layers:
            w = layer.self_attn.o_proj.weight
            w.copy_(torch.randn(w.shape, generator=g))
            layer.post_attention_layernorm.weight.mul_(0.2)
    asst.save_pretrained(tmp_path / "hfa")
    convert_cli(tmp_path / "hfa", a, monkeypatch)

    counts = {}

    def get_candidates(self, input_ids, model_kwargs, model_outputs, is_first_iteration, **kw):
        if counts["crop"] and not is_first_iteration:  # keys of positions 0 .. n_past - 1 only
            n_past = input_ids.shape[1] - 1
            kv = model_outputs.shared_kv_states
            model_outputs.shared_kv_states = {
                t: (k[:, :, :n_past], v[:, :, :n_past]) for t, (k, v) in kv.items()
            }
        ids, logits = orig_get(self, input_ids, model_kwargs=model_kwargs,
                               model_outputs=model_outputs, is_first_iteration=is_first_iteration,
                               **kw)  # fmt: skip
        counts["drafted"] += ids.shape[1] - input_ids.shape[1]
        return ids, logits

    def update(self, input_ids, scores, n_matches):
        counts["accepted"] += int(n_matches)
        return orig_update(self, input_ids, scores, n_matches)

    orig_get, orig_update = gen.get_candidates, gen.update_candidate_strategy
    monkeypatch.setattr(gen, "get_candidates", get_candidates)
    monkeypatch.setattr(gen, "update_candidate_strategy", update)
    text, n = "the river", 40
    prompt = load_tokenizer(GGUFFile(m).metadata).encode(text)
    stats, totals = tmp_path / "s.json", {"stock": [0, 0], "ours": [0, 0]}
    asst.generation_config.num_assistant_tokens_schedule = "constant"
    for k in (1, 2, 3, 4):
        argv = ["llm", "run", "-m", str(m), "-md", str(a), "--mtp", "--draft", str(k), "-p", text,
                "-n", str(n), "--temp", "0", "--ignore-eos", "--stats-json", str(stats)]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code in (0, None), capsys.readouterr().err
        run = json.loads(stats.read_text())
        assert run["prompt_tokens"] == len(prompt)
        ours = (run["speculative"]["accepted_tokens"], run["speculative"]["draft_tokens"])
        hf_runs = {}
        asst.generation_config.num_assistant_tokens = k
        for crop in (False, True):
            counts.update(drafted=0, accepted=0, crop=crop)
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), assistant_model=asst, do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip
            assert out[0, len(prompt) :].tolist() == run["tokens"]
            hf_runs[crop] = (counts["accepted"], counts["drafted"])
        print(f"draft {k}: transformers {hf_runs[False]}, with n_past keys {hf_runs[True]}, "
              f"llm run {ours} (accepted, drafted)")  # fmt: skip
        assert hf_runs[True] == ours and 0 < ours[0]
        for key, (acc, drafted) in (("stock", hf_runs[False]), ("ours", ours)):
            totals[key][0] += acc
            totals[key][1] += drafted
    stock, mine = (acc / drafted for acc, drafted in totals.values())
    print(f"pooled acceptance: transformers {stock:.3f}, llm run {mine:.3f}")
    assert abs(stock - mine) <= 0.05 and mine < 1  # drafts often, not always, accepted
