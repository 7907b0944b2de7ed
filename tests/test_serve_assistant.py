"""`llm serve -np 4 --mtp -md assistant.gguf` on a tiny random Gemma 4 (sliding window 5 under
4-token KV blocks, KV-shared trailing layers) with a near-"echo" assistant: plain gemma4 serving
through the paged pool is `llm run`'s greedy text; the assistant drafts for all slots in one
batched step over the target's pool (no draft KV, a one-sequence workspace reported in /slots);
greedy text of 4 concurrent, staggered requests of different lengths equals single-slot runs and
`llm run`, with the same acceptance; prefix sharing stays on; counters in /slots and /metrics."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
import torch

from llmkit.errors import LlmkitError
from serve_util import metric, wait_idle

pytest.importorskip("transformers")

PROMPTS = [
    "the river",
    "the old town, where the river runs through the town",
    "people",
    "a b c d e f g h i j k l",
]
N_GEN = [30, 12, 40, 20]
OPTS = dict(n_slots=4, n_ctx=128, n_ubatch=4, kv_block_size=4, draft=3, draft_policy="fixed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The target and an echo assistant whose attention matters: a random output projection
    under a small post-attention norm, so drafts depend on the KV each row reads and are
    often, not always, accepted."""
    from test_gemma4 import convert_cli
    from test_gemma4_assistant import build

    d = tmp_path_factory.mktemp("g4serve")
    g = torch.Generator().manual_seed(5)
    with pytest.MonkeyPatch.context() as mp:
        _, asst, m, a = build(d, mp, window=5, oracle=True)
        with torch.no_grad():
            for layer in asst.model.layers:
                w = layer.self_attn.o_proj.weight
                w.copy_(torch.randn(w.shape, generator=g))
                layer.post_attention_layernorm.weight.mul_(0.2)
        asst.save_pretrained(d / "hfa")
        convert_cli(d / "hfa", a, mp)
    return m, a


def _server(m, a=None, **kw):
    from llmkit.core.models.loader import load_model
    from llmkit.core.serve.engine import ServeOptions
    from llmkit.core.serve.server import HttpOptions, Server
    from llmkit.core.tokenizer import load_tokenizer

    lm = load_model(m)
    opts = ServeOptions(mtp=a is not None, assistant=str(a) if a else None, **(OPTS | kw))
    http = HttpOptions(port=0, metrics=True)
    return Server(lm, load_tokenizer(lm.metadata), opts, http, "tiny").start()


@pytest.fixture(scope="module")
def server(models):
    s = _server(*models)
    try:
        yield s
    finally:
        s.stop()


def _run(server, prompt, n, speculative=True, delay=0.0):
    time.sleep(delay)
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    body["speculative"] = speculative
    j = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    return j["choices"][0]["text"], j["timings"]


def _llm_run(m, a=None):
    """`llm run`'s greedy text of every prompt (with the assistant when given) and its stats."""
    from llmkit.core.api import LLM

    out = []
    for p, n in zip(PROMPTS, N_GEN, strict=True):
        extra = {"mtp": True, "model_draft": str(a), "draft": 3} if a else {}
        llm = LLM.load(m, **extra)
        text = llm.generate(p, n, ignore_eos=True, temp=0.0)
        out.append((text, llm.spec.stats if a else None))
    return out


def test_plain_gemma4_serves_like_llm_run(models):
    """KV-shared layers re-present their owner's K/V to the paged BatchCache; sliding blocks are
    freed under a window of 5 and 4-token blocks; prompts span several 4-token prefill chunks."""
    m, _ = models
    want = [t for t, _ in _llm_run(m)]
    s = _server(m)
    try:
        alone = [_run(s, p, n)[0] for p, n in zip(PROMPTS, N_GEN, strict=True)]
        with cf.ThreadPoolExecutor(4) as ex:
            args = [(s, p, n, True, 0.05 * i) for i, (p, n) in enumerate(zip(PROMPTS, N_GEN))]
            together = [t for t, _ in ex.map(lambda x: _run(*x), args)]
        again, t = _run(s, PROMPTS[1], N_GEN[1])  # its prompt blocks come from the prefix cache
    finally:
        s.stop()
    assert alone == want and together == want
    assert again == want[1] and t["cache_n"] > 0


def test_assistant_memory_is_one_sequence_workspace(server, models):
    from llmkit.core.decode.assistant import AssistantBatchDrafter
    from llmkit.core.models.loader import load_model
    from llmkit.core.serve.engine import Engine, ServeOptions
    from llmkit.core.tokenizer import load_tokenizer

    eng = server.engine
    assert isinstance(eng.drafter, AssistantBatchDrafter)
    plan = httpx.get(server.url + "/slots").json()["mtp"]
    assert plan["slots"] == 4 and plan["bytes"] == 0 and plan["reads"] == [3, 3, 2]
    # a row sees at most the window - 1 keys of a sliding layer, n_ctx of a full one
    assert plan["workspace"]["keys"] == {"3": 4, "2": 128}
    m, a = models
    lm = load_model(m)
    one = Engine(lm, load_tokenizer(lm.metadata), ServeOptions(mtp=True, assistant=str(a),
                                                               **(OPTS | {"n_slots": 1})))  # fmt: skip
    ws = one.mtp_plan["workspace"]["bytes"]
    assert ws == plan["workspace"]["bytes"] > 0  # sized for one sequence, whatever -np is
    # K and V of layer 3 (2 heads x 16, sliding) and layer 2 (2 heads x 32, full), f16 + fp32
    assert ws == 2 * (2 * 4 * 16 + 2 * 128 * 32) * (2 + 4) + 128
    pools = eng.pool.stats()["groups"]
    assert sorted(layer for g in pools.values() for layer in g["layers"]) == [0, 1, 2, 3]


def test_concurrent_slots_are_lossless_with_single_slot_acceptance(server, models):
    m, a = models
    ref = _llm_run(m, a)
    plain = [_run(server, p, n, speculative=False)[0] for p, n in zip(PROMPTS, N_GEN)]
    alone = [_run(server, p, n) for p, n in zip(PROMPTS, N_GEN, strict=True)]
    # staggered starts, different prompt lengths and max_tokens: slots join and leave mid-batch
    args = [(server, p, n, True, 0.05 * i) for i, (p, n) in enumerate(zip(PROMPTS, N_GEN))]
    with cf.ThreadPoolExecutor(4) as ex:
        together = list(ex.map(lambda x: _run(*x), args))
    for (want, stats), pl, (a_text, a_t), (t_text, t_t) in zip(ref, plain, alone, together):
        assert pl == want and a_text == want and t_text == want
        assert (t_t["draft_n"], t_t["draft_n_accepted"]) == (
            a_t["draft_n"],
            a_t["draft_n_accepted"],
        )
        # the same drafts as `llm run` with the assistant (its Q-only attention over a KVCache)
        assert (a_t["draft_n"], a_t["draft_n_accepted"]) == (
            stats.draft_tokens,
            stats.accepted_tokens,
        )
    accepted = sum(t["draft_n_accepted"] for _, t in together)
    drafted = sum(t["draft_n"] for _, t in together)
    print(f"4 slots with the assistant: {accepted}/{drafted} drafts accepted")
    assert 0 < accepted < drafted
    assert wait_idle(server)["requests_processing"] == 0


def test_prefix_sharing_and_acceptance_counters(server):
    text, t = _run(server, PROMPTS[1], N_GEN[1])
    again, t2 = _run(server, PROMPTS[1], N_GEN[1])
    assert again == text and t2["cache_n"] > 0 and t2["draft_n"] == t["draft_n"] > 0
    lab = '{spec_type="mtp"}'
    drafted = metric(server, "llamacpp:speculative_draft_tokens_generated_total" + lab)
    accepted = metric(server, "llamacpp:speculative_draft_tokens_accepted_total" + lab)
    assert drafted >= 2 * t["draft_n"] and 0 < accepted <= drafted
    slots = httpx.get(server.url + "/slots").json()
    assert sum(s["speculative"]["accepted_tokens"] for s in slots["slots"]) == accepted
    assert sum(s["speculative"]["draft_tokens"] for s in slots["slots"]) == drafted


def test_paged_reader_matches_the_single_sequence_read(models):
    """The paged read (gathered into the workspace) against attend_readonly over a KVCache
    holding the same K/V, at every position and for every KV type it stores as vectors."""
    from llmkit.core.cache.batch import BatchCache
    from llmkit.core.cache.paged import PagedKV
    from llmkit.core.models.gemma4_assistant import attend_readonly
    from llmkit.core.models.loader import load_model
    from llmkit.core.serve.drafting import PagedReader

    m, _ = models
    lm = load_model(m)
    layout = lm.model.kv_layout()
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    for kind in ("f16", "bf16", "f32"):
        pool = PagedKV(layout, 64, 4, 2, 8, kind, kind)
        cache = lm.new_cache(32, 8, kind, kind)
        reader = PagedReader(pool, layout, [3, 2], 32, 2)
        seq = pool.admit([], 32, 32, share=False)
        with torch.inference_mode():
            for T in (5, 5, 3, 1):  # each batch frees the sliding blocks behind its window
                p0, bc = seq.n_past, BatchCache(pool, [seq], [T])
                for c in (bc, cache):  # the same K/V written through each cache's own path
                    c.begin(c.positions(T))
                for il, spec in layout.items():
                    q = rnd(T, 4, spec.head_dim_k)
                    k, v = (
                        rnd(T, spec.n_head_kv, spec.head_dim_k),
                        rnd(T, spec.n_head_kv, spec.head_dim_v),
                    )
                    for c in (bc, cache):
                        c.attend(il, q, k, v, 1.0)
                for pos in range(p0 + 1, seq.n_past + 1):
                    for il, window in ((3, 5), (2, None)):  # sliding, full
                        q = rnd(2, 4, layout[il].head_dim_k)
                        got = reader.attend(seq, il, q, pos, window)
                        want = attend_readonly(cache, il, q, pos, window)
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with pytest.raises(LlmkitError, match="were freed"):  # behind the last batch's window
            reader.attend(seq, 3, rnd(1, 4, 16), 3, 5)
