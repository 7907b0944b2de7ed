"""`llm serve` hardening: every field checked at the edge (a 400 naming it), bounded JSON nesting,
a failure in one slot ends that request only, a hang-up frees the slot at once, slow bodies time
out, a full queue answers 503 + Retry-After, and scripts/load_test_serve.py at a small size."""

import concurrent.futures as cf
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmkit.core.decode import sampling
from llmkit.core.serve.server import HttpOptions
from serve_util import live_server, metric, wait_idle
from tiny_models import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CHAT = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("hardening") / "llama.gguf", seed=3)


@pytest.fixture(scope="module")
def server(tiny):
    http = HttpOptions(port=0, metrics=True, timeout_s=1.0)
    with live_server(tiny, http=http, n_slots=6, n_ctx=256, kv_block_size=16) as s:
        yield s


def _post(server, path: str, raw: bytes | str, **kw) -> httpx.Response:
    raw = raw.encode() if isinstance(raw, str) else raw
    headers = {"content-type": "application/json"}
    return httpx.post(server.url + path, content=raw, headers=headers, timeout=60, **kw)


BAD = [
    ('"seed": 1180591620717411303424', "'seed'"),  # 2**70
    ('"seed": 18446744073709551616', "'seed'"),  # 2**64
    ('"seed": -2', "'seed'"),
    ('"seed": true', "'seed'"),
    ('"seed": 1.5', "'seed'"),
    ('"temperature": NaN', "'temperature'"),
    ('"temperature": Infinity', "'temperature'"),
    ('"temperature": -1', "'temperature'"),
    ('"temperature": "hot"', "'temperature'"),
    ('"temperature": 1e400', "'temperature'"),
    ('"temperature": ' + "9" * 400, "'temperature'"),
    ('"top_p": 1.5', "'top_p'"),
    ('"top_p": -0.1', "'top_p'"),
    ('"top_p": NaN', "'top_p'"),
    ('"top_k": -1', "'top_k'"),
    ('"top_k": 1.5', "'top_k'"),
    ('"top_k": false', "'top_k'"),
    ('"min_p": 2', "'min_p'"),
    ('"repeat_penalty": 0', "'repeat_penalty'"),
    ('"repeat_penalty": NaN', "'repeat_penalty'"),
    ('"repeat_last_n": -5', "'repeat_last_n'"),
    ('"presence_penalty": 3', "'presence_penalty'"),
    ('"frequency_penalty": NaN', "'frequency_penalty'"),
    ('"max_tokens": 0', "'max_tokens'"),
    ('"max_tokens": -1', "'max_tokens'"),
    ('"max_tokens": 1000000000', "'max_tokens'"),
    ('"max_tokens": true', "'max_tokens'"),
    ('"max_tokens": "8"', "'max_tokens'"),
    ('"n": true', "'n'"),
    ('"stream": "yes"', "'stream'"),
    ('"stream": 1', "'stream'"),
    ('"stream_options": {"include_usage": 1}', "include_usage"),
    ('"stop": [""]', "'stop'"),
    ('"stop": [1]', "'stop'"),
    ('"id_slot": true', "'id_slot'"),
    ('"id_slot": -1', "id_slot"),
    ('"ignore_eos": "no"', "'ignore_eos'"),
    ('"model": 5', "'model'"),
]


@pytest.mark.parametrize("field, name", BAD)
def test_bad_fields_are_400_naming_the_field(server, field, name):
    r = _post(server, "/v1/chat/completions", "{" + CHAT + ", " + field + "}")
    assert r.status_code == 400, r.text
    assert name in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "field, name",
    [('"seed": 1180591620717411303424', "'seed'"), ('"max_tokens": true', "'max_tokens'")],
)
def test_bad_fields_in_the_anthropic_api(server, field, name):
    r = _post(server, "/v1/messages", '{"max_tokens": 4, ' + CHAT + ", " + field + "}")
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert name in r.json()["error"]["message"]


def test_edge_values_are_accepted(server):
    for field in ('"seed": 18446744073709551615', '"seed": -1', '"top_p": 0', '"top_k": 0'):
        r = _post(server, "/v1/chat/completions", "{" + CHAT + ', "max_tokens": 2, ' + field + "}")
        assert r.status_code == 200, (field, r.text)


@pytest.mark.parametrize("depth", [65, 1000, 200_000])
def test_deep_json_is_400_not_a_crash(server, depth, capfd):
    raw = '{"prompt": "x", "stop": ' + "[" * depth + "]" * depth + "}"
    r = _post(server, "/v1/completions", raw)
    assert r.status_code == 400 and "deeper than 64" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", "[" * depth)  # unbalanced as well
    assert r.status_code == 400
    assert "RecursionError" not in capfd.readouterr().err
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_shallow_json_still_parses(server):
    raw = '{"prompt": "x", "max_tokens": 2, "metadata": {"x": ' + "[" * 60 + "]" * 60 + "}}"
    assert _post(server, "/v1/completions", raw).status_code == 200


def _stream_text(url: str, body: dict) -> tuple[str, list[dict]]:
    """(text, error payloads) of a streamed completion."""
    parts, errors = [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            j = json.loads(line[6:])
            if "error" in j:
                errors.append(j["error"])
            else:
                parts.append(j["choices"][0]["text"])
    return "".join(parts), errors


def test_a_failing_slot_ends_only_its_own_request(server, monkeypatch):
    prompts = [f"healthy request number {i}" for i in range(3)]
    bodies = [
        {"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
        for p in prompts
    ]
    alone = [_stream_text(server.url, b) for b in bodies]
    assert all(t and not e for t, e in alone)

    real = sampling.Sampler.choose

    def poisoned(self, logits):
        self.n_calls = getattr(self, "n_calls", 0) + 1
        if self.p.seed == 666 and self.n_calls > 3:  # mid-decode, beside the healthy slots
            raise RuntimeError("poisoned sampler")
        return real(self, logits)

    monkeypatch.setattr(sampling.Sampler, "choose", poisoned)
    bad = {"prompt": "poison", "max_tokens": 40, "ignore_eos": True, "seed": 666}
    before = metric(server, "llamacpp:requests_failed_total")
    with cf.ThreadPoolExecutor(5) as ex:
        healthy = [ex.submit(_stream_text, server.url, b) for b in bodies]
        plain = ex.submit(_post, server, "/v1/completions", json.dumps(bad))
        streamed = ex.submit(_stream_text, server.url, {**bad, "stream": True})
        assert [f.result() for f in healthy] == alone
        r = plain.result()
        assert (
            r.status_code == 500
            and "internal error in this request" in r.json()["error"]["message"]
        )
        text, errors = streamed.result()
        assert len(errors) == 1 and "internal error in this request" in errors[0]["message"]
    snap = wait_idle(server)
    assert all(s["state"] == "idle" for s in snap["slots"])
    assert metric(server, "llamacpp:requests_failed_total") == before + 2


def test_hangup_mid_stream_frees_the_slot_at_once(server):
    wait_idle(server)
    before = metric(server, "llamacpp:requests_cancelled_total")
    done_before = metric(server, "llamacpp:requests_completed_total")
    body = {"prompt": "long one", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
        t0 = time.monotonic()
    snap = wait_idle(server, timeout=2.0)
    assert time.monotonic() - t0 < 2.0 and snap["requests_processing"] == 0
    assert metric(server, "llamacpp:requests_cancelled_total") == before + 1
    assert metric(server, "llamacpp:requests_completed_total") == done_before


def test_hangup_while_queued_or_waiting_is_noticed(server, monkeypatch):
    """The engine is held: the request sits in the queue, no chunk is ever sent; the hang-up is
    still seen (the stream watches for the disconnect, it does not wait for the next send)."""
    wait_idle(server)
    gate = threading.Event()
    real = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (gate.wait(10), real())[1])
    body = {"prompt": "queued", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
    t0 = time.monotonic()
    while not all(q.cancelled for q in server.engine.queue):
        assert time.monotonic() - t0 < 2.0, "hang-up not noticed"
        time.sleep(0.01)
    gate.set()
    wait_idle(server)


def test_slow_body_times_out_with_408(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert b" 408 " in reply.split(b"\r\n")[0] and time.monotonic() - t0 < 5
    assert httpx.get(server.url + "/health").status_code == 200


def test_full_queue_is_503_with_retry_after(server, monkeypatch):
    wait_idle(server)
    gate = threading.Event()
    real = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (gate.wait(30), real())[1])
    monkeypatch.setattr(server.engine.opts, "max_queue", 2)
    body = json.dumps({"prompt": "wait", "max_tokens": 2})
    with cf.ThreadPoolExecutor(2) as ex:
        waiting = [ex.submit(_post, server, "/v1/completions", body) for _ in range(2)]
        t0 = time.monotonic()
        while len(server.engine.queue) < 2:
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        r = _post(server, "/v1/completions", body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
        r = _post(server, "/v1/messages", '{"max_tokens": 2, ' + CHAT + "}")
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        gate.set()
        assert [f.result().status_code for f in waiting] == [200, 200]
    assert metric(server, "llamacpp:requests_rejected_total") == 2


def test_api_key_is_compared_in_constant_time(tiny, monkeypatch):
    from llmkit.core.serve import app as app_mod

    calls = []
    real = app_mod.hmac.compare_digest
    monkeypatch.setattr(app_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    http = HttpOptions(port=0, api_key="k" * 40)
    with live_server(tiny, http=http, n_slots=1, n_ctx=64) as s:
        for key, status in (("k", 401), ("k" * 40, 200), ("x" * 40, 401), (b"\xe9", 401)):
            r = httpx.get(s.url + "/v1/models", headers={"x-api-key": key})
            assert r.status_code == status
    assert len(calls) == 4


def test_load_test_script_small(tiny):
    cmd = [sys.executable, str(ROOT / "scripts" / "load_test_serve.py"), "--model", str(tiny)]
    cmd += ["--requests", "100", "--clients", "8", "--rss-limit-mib", "100"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads(p.stdout)
    assert summary["ok"] and summary["requests"] == 100
    assert summary["slot_leak"] is False and summary["unexpected_500"] == 0


def test_a_client_that_stops_reading_is_dropped():
    """TimedStream: a send that never completes (the client's buffers are full) ends the stream
    after the timeout, and the body generator is closed (its finally cancels the request)."""
    import asyncio

    from llmkit.core.serve.app import TimedStream

    closed = []

    async def body():
        try:
            for i in range(1000):
                yield f"data: {i}\n\n"
        finally:
            closed.append(True)

    async def stuck_send(message):
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    async def main():
        await TimedStream(body(), 0.2).stream_response(stuck_send)

    t0 = time.monotonic()
    asyncio.run(main())
    assert closed == [True] and time.monotonic() - t0 < 2


def test_slot_never_samples_from_non_finite_logits():
    """A model producing NaN / inf logits fails the request naming the cause (the engine ends
    that request only) instead of sampling a token from garbage."""
    import torch

    from llmkit.core.decode.sampling import Sampler, SamplerParams
    from llmkit.core.serve.slot import Slot
    from llmkit.errors import LlmkitError

    slot = Slot(0, False, sampler=Sampler(SamplerParams(temp=0)))
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(8)
        logits[3] = bad
        with pytest.raises(LlmkitError, match="non-finite logits"):
            slot.pick(logits)
