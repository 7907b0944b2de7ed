"""Multi-slot MTP on a tiny step35 model with -np 4: reserve-only MTP memory (the first request on
the last slot works), lossless greedy output per request, per-slot acceptance equal to single-slot
runs of the same prompts, speculative counters in /metrics; and the draft policy's choices."""

import concurrent.futures as cf

import httpx
import pytest

from llmkit.core.serve.policy import DraftPolicy
from serve_util import live_server, metric, wait_idle
from tiny_step35 import write_tiny_step35

PROMPTS = ["the cat sat", "hello world", "one two three four", "a b c d e f g"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # draft_noise: a model whose NextN heads are often (not always) right
    path = write_tiny_step35(tmp_path_factory.mktemp("mtp") / "s35.gguf", seed=4, draft_noise=0.6)
    opts = {"n_slots": 4, "n_ctx": 256, "draft": 3, "draft_policy": "fixed", "kv_block_size": 8}
    with live_server(path, mtp=True, **opts) as s:
        yield s


def _run(server, prompt, speculative=True, id_slot=None, n=24):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    body["speculative"] = speculative
    if id_slot is not None:
        body["id_slot"] = id_slot
    j = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    return j["choices"][0]["text"], j["timings"]


def test_mtp_memory_is_reserved_at_start_and_the_last_slot_works(server):
    snap = server.engine.snapshot
    plan = snap["mtp"]
    assert plan["slots"] == 4 and plan["heads"] == 3
    assert plan["bytes"] == 4 * plan["bytes_per_slot"] > 0
    pools = server.engine.drafter.kv.pools
    assert all(g.used == 0 for p in pools for g in p.groups.values())  # reserved, none in use
    text, t = _run(server, PROMPTS[0], id_slot=3)
    assert t["id_slot"] == 3 and t["predicted_n"] == 24 and t["draft_n"] > 0


def test_multi_slot_mtp_is_lossless_with_single_slot_acceptance(server):
    plain = [_run(server, p, speculative=False)[0] for p in PROMPTS]
    alone = [_run(server, p) for p in PROMPTS]
    with cf.ThreadPoolExecutor(4) as ex:
        together = list(ex.map(lambda p: _run(server, p), PROMPTS))
    for want, (a_text, a_t), (t_text, t_t) in zip(plain, alone, together):
        assert a_text == want and t_text == want  # greedy MTP output is the plain output
        assert (t_t["draft_n"], t_t["draft_n_accepted"]) == (
            a_t["draft_n"],
            a_t["draft_n_accepted"],
        )
    accepted = sum(t["draft_n_accepted"] for _, t in together)
    drafted = sum(t["draft_n"] for _, t in together)
    assert 0 < accepted < drafted  # the drafts are neither always nor never right
    wait_idle(server)


def test_speculative_counters_in_metrics(server):
    text, t = _run(server, PROMPTS[1])
    lab = '{spec_type="mtp"}'
    assert metric(server, "llamacpp:speculative_drafts_generated_total" + lab) > 0
    drafted = metric(server, "llamacpp:speculative_draft_tokens_generated_total" + lab)
    accepted = metric(server, "llamacpp:speculative_draft_tokens_accepted_total" + lab)
    per_pos = metric(server, "llamacpp:speculative_accepted_tokens_per_pos_total")
    assert drafted >= t["draft_n"] > 0 and per_pos == accepted > 0
    slots = httpx.get(server.url + "/slots").json()
    assert slots["draft_policy"]["mode"] == "fixed"
    assert sum(s["speculative"]["accepted_tokens"] for s in slots["slots"]) == accepted


def test_draft_policy_shrinks_drafts_when_rows_cost_and_drafts_miss():
    p = DraftPolicy(draft_max=3, adaptive=True, max_rows=16)
    assert p.choose(0, 8) == 3  # nothing measured yet: try the configured length
    for rows in range(1, 33):
        p.observe_forward(rows, 0.001 * rows)  # CPU GEMV rows: cost linear in rows
    p.observe_draft(1, 0.0005)
    for _ in range(50):
        p.observe_accept(3, 0)  # drafts always rejected at the first position
    assert p.choose(0, 8) == 0 and "busy slots" in p.describe()["reason"]
    q = DraftPolicy(draft_max=3, adaptive=True, max_rows=16)
    for rows in range(1, 33):
        q.observe_forward(rows, 0.010)  # flat cost (bandwidth-bound): rows are free
    q.observe_draft(1, 0.0001)
    for _ in range(50):
        q.observe_accept(3, 3)  # always accepted
    assert q.choose(0, 4) == 3
    assert DraftPolicy(draft_max=2, adaptive=False).choose(0, 8) == 2
