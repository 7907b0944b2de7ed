"""8 concurrent clients x 25 requests mixing good requests, malformed JSON, oversized prompts and
bodies, bad API keys and clients that hang up mid-stream, against a server with a KV pool too small
for all slots at once (requests get deferred): it keeps serving, nothing leaks (slots idle, pool
back to no used or reserved block) and /metrics counters equal what the clients were sent."""

import concurrent.futures as cf
import json
from dataclasses import dataclass, field

import httpx
import pytest

from llmkit.core.serve.server import HttpOptions
from serve_util import live_server, metric, wait_idle
from tiny_models import write_tiny_llama

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("abuse") / "llama.gguf", seed=2)
    http = HttpOptions(port=0, api_key=KEY, metrics=True, max_body_bytes=16 * 1024)
    # 4 slots x 256 tokens would need 64 blocks; the pool has 40: some requests must wait
    opts = {"n_slots": 4, "n_ctx": 256, "kv_tokens": 640, "kv_block_size": 16}
    with live_server(path, http=http, **opts) as s:
        yield s


@dataclass
class Tally:
    completed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    hangups: int = 0
    errors: dict = field(default_factory=dict)

    def add(self, other: "Tally") -> None:
        self.completed += other.completed
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.hangups += other.hangups
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v


def _client(url: str, worker: int) -> Tally:
    t = Tally()
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(25):
            kind = (worker + i) % 7
            words = f"client {worker} request {i} " + "go " * ((worker * 7 + i) % 13)
            if kind == 0:  # good chat, not streamed
                body = {"messages": [{"role": "user", "content": words}], "max_tokens": 8}
                j = c.post("/v1/chat/completions", json=body, headers=AUTH).json()
                t.completed += 1
                t.prompt_tokens += j["usage"]["prompt_tokens"]
                t.completion_tokens += j["usage"]["completion_tokens"]
            elif kind == 1:  # good completion, streamed, usage in the last chunk
                body = {"prompt": words, "max_tokens": 6 + i % 5, "stream": True, "seed": i}
                body["stream_options"] = {"include_usage": True}
                with c.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
                    lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                usage = json.loads(lines[-2][6:])["usage"]
                t.completed += 1
                t.prompt_tokens += usage["prompt_tokens"]
                t.completion_tokens += usage["completion_tokens"]
            elif kind == 2:  # good Anthropic message, x-api-key header
                body = {"max_tokens": 5, "messages": [{"role": "user", "content": words}]}
                r = c.post("/v1/messages", json=body, headers={"x-api-key": KEY})
                j = r.json()
                t.completed += 1
                t.prompt_tokens += j["usage"]["input_tokens"]
                t.completion_tokens += j["usage"]["output_tokens"]
            elif kind == 3:  # malformed JSON
                r = c.post("/v1/chat/completions", content=b'{"messages": [', headers=AUTH)
                assert r.status_code == 400 and "error" in r.json()
                t.errors[400] = t.errors.get(400, 0) + 1
            elif kind == 4:  # oversized: a prompt beyond the context, or a body beyond the limit
                big = "w " * 300 if i % 2 else "w" * 20000
                r = c.post("/v1/completions", json={"prompt": big}, headers=AUTH)
                assert r.status_code in (400, 413) and r.json()["error"]["message"]
                t.errors[r.status_code] = t.errors.get(r.status_code, 0) + 1
            elif kind == 5:  # bad or missing API key
                hdr = {"x-api-key": "wrong"} if i % 2 else {}
                r = c.post("/v1/messages", json={"max_tokens": 5, "messages": []}, headers=hdr)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
                t.errors[401] = t.errors.get(401, 0) + 1
            else:  # hangs up after the first streamed chunk of a long generation
                body = {"prompt": words, "max_tokens": 200, "stream": True, "ignore_eos": True}
                with c.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
                    next(r.iter_lines())
                t.hangups += 1
    return t


def test_abuse_keeps_serving_and_leaks_nothing(server):
    total = Tally()
    with cf.ThreadPoolExecutor(8) as ex:
        for t in ex.map(lambda w: _client(server.url, w), range(8)):
            total.add(t)
    assert total.completed > 0 and total.hangups > 0 and set(total.errors) >= {400, 401}
    snap = wait_idle(server)
    assert all(s["state"] == "idle" for s in snap["slots"])
    for g in snap["kv"]["groups"].values():
        assert g["blocks_used"] == 0 and g["blocks_reserved"] == 0
    m = lambda name: metric(server, name, AUTH)  # noqa: E731
    assert m("llamacpp:requests_completed_total") == total.completed
    assert m("llamacpp:prompt_tokens_total") == total.prompt_tokens
    assert m("llamacpp:tokens_predicted_total") == total.completion_tokens
    assert m("llamacpp:requests_cancelled_total") == total.hangups
    assert m("llamacpp:requests_processing") == 0 and m("llamacpp:requests_deferred") == 0
    assert m("llamacpp:n_decode_total") > 0
    # and it still answers
    body = {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_health_is_open_everything_else_needs_the_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/v1/models", "/slots", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200


def test_requests_that_do_not_fit_the_pool_wait_and_then_run(server):
    """Three requests of 16 blocks each against a 40-block pool: one must wait for blocks."""
    wait_idle(server)
    before = metric(server, "llamacpp:requests_deferrals_total", AUTH)
    body = {"prompt": "w " * 20, "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    def one(_):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=120)
        return r.json()["usage"]["completion_tokens"]

    with cf.ThreadPoolExecutor(3) as ex:
        assert list(ex.map(one, range(3))) == [200] * 3
    assert metric(server, "llamacpp:requests_deferrals_total", AUTH) == before + 1
    snap = wait_idle(server)
    assert all(g["blocks_used"] == 0 for g in snap["kv"]["groups"].values())
