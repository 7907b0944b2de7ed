"""`llm serve` against the official openai and anthropic SDKs on loopback (tiny step35 model, 8
slots): chat, completions, messages, streaming and not, stop sequences, usage, errors in each API's
own shape, batch-invariant greedy output, prefix sharing."""

import concurrent.futures as cf

import anthropic
import httpx
import openai
import pytest

from llmkit.core.serve.server import HttpOptions
from serve_util import live_server, metric, sdk_clients, wait_idle
from tiny_step35 import write_tiny_step35

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_step35(tmp_path_factory.mktemp("serve") / "s35.gguf", seed=0, layout="trunk")
    http = HttpOptions(port=0, metrics=True, max_body_bytes=64 * 1024)
    with live_server(path, http=http, n_slots=8, n_ctx=256, kv_block_size=8) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return sdk_clients(server.url)[0]


@pytest.fixture(scope="module")
def ant(server):
    return sdk_clients(server.url)[1]


def _chat(oai, msgs, n=16, stream=False, **extra):
    kw = {"model": "tiny", "messages": msgs, "max_tokens": n, "extra_body": {**GREEDY, **extra}}
    if not stream:
        r = oai.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    parts, finish, usage = [], None, None
    chunks = oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    for ch in chunks:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    return "".join(parts), finish, usage


def test_chat_streaming_and_not_agree_with_usage(server, oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    text, finish, usage = _chat(oai, msgs)
    assert text and finish == "length"
    n_prompt = len(server.prompter.chat(msgs))
    assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, 16)
    assert usage.total_tokens == n_prompt + 16
    assert _chat(oai, msgs, stream=True) == (text, finish, usage)


def test_completions_streaming_and_not(server, oai):
    kw = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 12, "extra_body": GREEDY}
    r = oai.completions.create(**kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(server.prompter.text("the cat sat"))
    parts = [c.choices[0].text for c in oai.completions.create(**kw, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].text


def test_stop_sequences_cut_the_text_in_both_apis(oai, ant):
    msgs = [{"role": "user", "content": "tell me a story"}]
    full, _, _ = _chat(oai, msgs, n=40)
    k = next(i for i in range(4, len(full) - 3) if full.find(full[i : i + 3]) == i)
    stop = full[k : k + 3]
    text, finish, usage = _chat(oai, msgs, n=40, stop=[stop])
    assert (text, finish) == (full[:k], "stop") and usage.completion_tokens < 40
    assert _chat(oai, msgs, n=40, stream=True, stop=stop)[:2] == (full[:k], "stop")
    m = ant.messages.create(
        model="tiny", max_tokens=40, messages=msgs, stop_sequences=[stop], extra_body=GREEDY
    )
    assert m.content[0].text == full[:k]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)


def test_anthropic_messages_streaming_and_not(server, ant):
    msgs = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}],
        }
    ]
    kw = {"model": "tiny", "max_tokens": 10, "system": "Be kind.", "messages": msgs}
    m = ant.messages.create(**kw, extra_body=GREEDY)
    n_prompt = len(
        server.prompter.chat(
            [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}]
        )
    )
    assert m.stop_reason == "max_tokens" and m.role == "assistant"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (n_prompt, 10)
    with ant.messages.stream(**kw, extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10


def test_models_health_slots(server, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    snap = httpx.get(server.url + "/slots").json()
    assert len(snap["slots"]) == 8 and snap["kv"]["block_size"] == 8


@pytest.mark.parametrize(
    "path, body, status, match",
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "must not be empty"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "n": 99}',
            400,
            "'n'",
        ),
        ("/v1/completions", b'{"prompt": 5}', 400, "'prompt'"),
        ("/v1/completions", b'{"prompt": "x", "logprobs": 99}', 400, "'logprobs'"),
        ("/v1/completions", b'{"prompt": "x", "suffix": "y"}', 400, "'suffix'"),
        ("/v1/completions", b'{"prompt": "x", "wat": 1}', 400, "'wat'"),
        (
            "/v1/messages",
            b'{"max_tokens": 5, "messages": [], "container": "c"}',
            400,
            "'container'",
        ),
        ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
        ("/v1/completions", b'{"prompt": "x", "id_slot": 99}', 400, "id_slot"),
        ("/v1/completions", b'{"prompt": "' + b"w " * 400 + b'"}', 400, "context"),
        ("/v1/completions", b'{"prompt": "' + b"w" * 70000 + b'"}', 413, "exceeds"),
        ("/v1/messages", b"[]", 400, "JSON object"),
        ("/v1/messages", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "max_tokens"),
        (
            "/v1/messages",
            b'{"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}',
            400,
            "text content",
        ),
        ("/v1/nothing", b"{}", 404, "Not Found"),
    ],
)
def test_errors_are_json_in_the_apis_own_shape(server, path, body, status, match):
    r = httpx.post(server.url + path, content=body)
    assert r.status_code == status
    j = r.json()
    if path.startswith("/v1/messages"):
        assert j["type"] == "error" and match in j["error"]["message"]
    else:
        assert match in j["error"]["message"] and "type" in j["error"]


def test_sdk_raises_its_own_errors(oai, ant):
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    with pytest.raises(anthropic.BadRequestError):
        ant.messages.create(model="tiny", max_tokens=0, messages=[{"role": "user", "content": "x"}])


def test_greedy_output_is_the_same_alone_or_beside_7_others(server, oai):
    """Decode batches of <= 16 rows run each row through the M=1 kernel and attention per
    sequence: a request's greedy tokens do not depend on what else is running. (cache_prompt
    off: a cached prefix changes how many prompt rows one prefill forward holds, and so which
    matmul regime - bf16 rows or fp32 GEMM - computes them.)"""
    prompts = [f"request number {i} says" + " more" * i for i in range(8)]
    body = {**GREEDY, "cache_prompt": False}

    def one(p):
        r = oai.completions.create(model="tiny", prompt=p, max_tokens=20, extra_body=body)
        return r.choices[0].text

    alone = [one(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(one, prompts))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really produce different texts


def test_prefix_sharing_reuses_blocks_and_changes_nothing(server):
    system = "You are a careful assistant of the tiny test suite. " * 2  # ~ 100 tokens
    a = [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]
    b = [{"role": "system", "content": system}, {"role": "user", "content": "second one"}]

    def chat(msgs):
        body = {"messages": msgs, "max_tokens": 16, **GREEDY}
        j = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        return j["choices"][0]["message"]["content"], j["timings"]["cache_n"]

    pa, pb = server.prompter.chat(a), server.prompter.chat(b)
    common = next(i for i, (x, y) in enumerate(zip(pa, pb)) if x != y)
    hits0 = metric(server, "llamacpp:prefix_cache_hits_total")
    cached0 = metric(server, "llamacpp:prompt_tokens_cached_total")
    b_fresh, n0 = chat(b)  # only the chat template's opening block was seen before
    assert n0 < common // 8 * 8
    a_text, n1 = chat(a)  # shares the system prompt's whole blocks with b
    assert n1 == common // 8 * 8
    b_shared, n2 = chat(b)  # shares all of b's prompt but the block holding its last token
    assert n2 == min(len(pb) // 8 * 8, len(pb) - 1)
    assert b_shared == b_fresh
    cached = metric(server, "llamacpp:prompt_tokens_cached_total") - cached0
    assert cached == n0 + n1 + n2
    assert metric(server, "llamacpp:prefix_cache_hits_total") == hits0 + (n0 > 0) + 2
    snap = wait_idle(server)
    assert all(g["blocks_used"] == 0 for g in snap["kv"]["groups"].values())
