"""OpenAI request fields honoured by `llm serve`, through the official clients: logprobs (chat and
legacy shapes, streamed and not), n > 1, echo, seed, logit_bias, presence/frequency penalties; and
a walk over the SDKs' request schemas: every field is honoured or refused with a 400 naming it."""

import math

import httpx
import openai
import pytest
import torch
from anthropic.types import message_count_tokens_params as ant_count
from anthropic.types import message_create_params as ant_create
from openai.types import completion_create_params as oai_completion
from openai.types import embedding_create_params as oai_embedding
from openai.types.chat import completion_create_params as oai_chat

from llmkit.core.serve import schema
from llmkit.core.serve.server import HttpOptions
from serve_util import live_server, sdk_clients
from tiny_step35 import write_tiny_step35

GREEDY = {"ignore_eos": True}
MSGS = [{"role": "user", "content": "tell me something"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_step35(tmp_path_factory.mktemp("fields") / "s35.gguf", seed=0, layout="trunk")
    with live_server(path, http=HttpOptions(port=0), n_slots=4, n_ctx=256, kv_block_size=8) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return sdk_clients(server.url)[0]


@pytest.fixture(scope="module")
def ant(server):
    return sdk_clients(server.url)[1]


def _chat(oai, n=12, **kw):
    extra = {**GREEDY, **kw.pop("extra_body", {})}
    kw.setdefault("temperature", 0)
    return oai.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=n, extra_body=extra, **kw
    )


def test_chat_logprobs_match_the_model_and_the_text(server, oai):
    r = _chat(oai, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert "".join(t.token for t in content) == c.message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.bytes == list(t.token.encode()) or "\ufffd" in t.token
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1.0 + 1e-5
        assert t.logprob <= 0
    # the first token's log-probability is the model's log-softmax after the prompt
    ids = server.prompter.chat(MSGS)
    lm = server.engine.lm
    with torch.inference_mode():
        logits = lm.model.forward(
            torch.tensor(ids), lm.new_cache(len(ids) + 8), logits="last"
        ).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    first = int(torch.argmax(lp))
    assert content[0].logprob == pytest.approx(float(lp[first]), abs=1e-3)
    # streamed: the same entries, spread over the chunks
    chunks = _chat(oai, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        t
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for t in ch.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in content
    ]


def test_chat_without_logprobs_has_none(oai):
    assert _chat(oai).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        _chat(oai, top_logprobs=2)


def test_completion_logprobs_legacy_shape(oai):
    kw = {"model": "tiny", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
    r = oai.completions.create(**kw, logprobs=2, extra_body=GREEDY)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for _tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(l)
    parts = list(oai.completions.create(**kw, logprobs=2, stream=True, extra_body=GREEDY))
    toks = [
        t
        for p in parts
        if p.choices and p.choices[0].logprobs
        for t in p.choices[0].logprobs.tokens
    ]
    assert toks == lp.tokens


def test_n_choices_are_independent_and_usage_is_summed(server, oai):
    r = _chat(oai, n=10, temperature=1.0, seed=5, extra_body={"n": 3})
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # seeds 5, 6, 7
    assert r.usage.completion_tokens == 30
    assert r.usage.prompt_tokens == len(server.prompter.chat(MSGS))
    again = _chat(oai, n=10, temperature=1.0, seed=5, extra_body={"n": 3})
    assert [c.message.content for c in again.choices] == texts  # the seed is honoured
    chunks = _chat(oai, n=10, temperature=1.0, seed=5, stream=True, extra_body={"n": 3})
    got = {0: "", 1: "", 2: ""}
    for ch in chunks:
        for c in ch.choices:
            got[c.index] += c.delta.content or ""
    assert [got[i] for i in range(3)] == texts
    c = oai.completions.create(
        model="tiny", prompt="a b", max_tokens=4, n=2, best_of=2, extra_body={"ignore_eos": True}
    )  # unseeded: EOS could come early
    assert len(c.choices) == 2 and c.usage.completion_tokens == 8


def test_echo_prepends_the_prompt(oai):
    kw = {"model": "tiny", "prompt": "once upon", "max_tokens": 6, "temperature": 0}
    plain = oai.completions.create(**kw).choices[0].text
    assert oai.completions.create(**kw, echo=True).choices[0].text == "once upon" + plain
    parts = [p.choices[0].text for p in oai.completions.create(**kw, echo=True, stream=True)]
    assert "".join(parts) == "once upon" + plain


def test_logit_bias_bans_the_greedy_token(server, oai):
    base = _chat(oai, n=6, logprobs=True, top_logprobs=1)
    first = base.choices[0].logprobs.content[0].token
    body = {"prompt": server.prompter.chat(MSGS), "n_predict": 6, "temperature": 0, "n_probs": 1}
    native = httpx.post(server.url + "/completion", json={**body, **GREEDY}).json()
    assert native["content"] == base.choices[0].message.content
    tid = native["completion_probabilities"][0]["id"]
    biased = _chat(oai, n=6, logprobs=True, logit_bias={str(tid): -100})
    assert biased.choices[0].logprobs.content[0].token != first
    assert biased.choices[0].message.content != base.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _chat(oai, logit_bias={"99999999": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _chat(oai, logit_bias={"1": 500})


def test_presence_and_frequency_penalties_change_the_output(oai):
    base = _chat(oai, n=40, logprobs=True).choices[0].logprobs.content
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        pen = _chat(oai, n=40, logprobs=True, **kw).choices[0].logprobs.content
        assert [t.token for t in pen] != [t.token for t in base]
        assert len({t.token for t in pen}) >= len({t.token for t in base})


def test_informational_fields_are_accepted_and_type_checked(oai, ant):
    r = _chat(oai, n=2, user="u1", metadata={"k": "v"}, safety_identifier="s", store=False)
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="'user'"):
        _chat(oai, user=5)
    with pytest.raises(openai.BadRequestError, match="'store'"):
        _chat(oai, store=True)
    m = ant.messages.create(
        model="tiny", max_tokens=2, messages=MSGS, metadata={"user_id": "u"}, service_tier="auto"
    )
    assert m.usage.output_tokens >= 1


def test_anthropic_messages_sampling_and_stop(ant):
    m = ant.messages.create(
        model="tiny",
        max_tokens=4,
        messages=MSGS,
        system="hi",
        stop_sequences=["zzz"],
        extra_body={"temperature": 0, "top_p": 0.9, "top_k": 5},
    )
    assert m.stop_reason in ("max_tokens", "end_turn")


# Every field of the SDKs' request types: honoured (the test named here covers it), owned by the
# structured-output/tools code, or refused with a 400 that names it.
HONOURED = {
    "messages": "test_chat_logprobs_match_the_model_and_the_text",
    "model": "test_chat_logprobs_match_the_model_and_the_text",
    "prompt": "test_completion_logprobs_legacy_shape",
    "max_tokens": "test_chat_logprobs_match_the_model_and_the_text",
    "max_completion_tokens": "test_max_completion_tokens",
    "temperature": "test_n_choices_are_independent_and_usage_is_summed",
    "top_p": "test_anthropic_messages_sampling_and_stop",
    "top_k": "test_anthropic_messages_sampling_and_stop",
    "seed": "test_n_choices_are_independent_and_usage_is_summed",
    "n": "test_n_choices_are_independent_and_usage_is_summed",
    "best_of": "test_n_choices_are_independent_and_usage_is_summed",
    "stream": "test_n_choices_are_independent_and_usage_is_summed",
    "stream_options": "test_max_completion_tokens",
    "stop": "test_max_completion_tokens",
    "stop_sequences": "test_anthropic_messages_sampling_and_stop",
    "system": "test_anthropic_messages_sampling_and_stop",
    "logprobs": "test_completion_logprobs_legacy_shape",
    "top_logprobs": "test_chat_logprobs_match_the_model_and_the_text",
    "logit_bias": "test_logit_bias_bans_the_greedy_token",
    "presence_penalty": "test_presence_and_frequency_penalties_change_the_output",
    "frequency_penalty": "test_presence_and_frequency_penalties_change_the_output",
    "echo": "test_echo_prepends_the_prompt",
    "suffix": "test_every_schema_field_is_honoured_or_refused_by_name",  # only "" (PROBE)
    "user": "test_informational_fields_are_accepted_and_type_checked",
    "metadata": "test_informational_fields_are_accepted_and_type_checked",
    "safety_identifier": "test_informational_fields_are_accepted_and_type_checked",
    "store": "test_informational_fields_are_accepted_and_type_checked",
    "service_tier": "test_informational_fields_are_accepted_and_type_checked",
    "prompt_cache_key": "test_informational_fields_are_accepted_and_type_checked",
    "cache_control": "test_informational_fields_are_accepted_and_type_checked",
    "modalities": "test_default_only_fields",
    "thinking": "test_default_only_fields",
    "parallel_tool_calls": "test_default_only_fields",
    "input": "test_embeddings_with_both_encodings (test_serve_endpoints.py)",
    "encoding_format": "test_embeddings_with_both_encodings (test_serve_endpoints.py)",
    "dimensions": "test_embeddings_with_both_encodings (test_serve_endpoints.py)",
}
ENDPOINTS = [
    ("/v1/chat/completions", oai_chat.CompletionCreateParamsBase, {"messages": MSGS}),
    ("/v1/completions", oai_completion.CompletionCreateParamsBase, {"prompt": "x"}),
    ("/v1/embeddings", oai_embedding.EmbeddingCreateParams, {"input": "x"}),
    ("/v1/messages", ant_create.MessageCreateParamsBase, {"messages": MSGS, "max_tokens": 2}),
    ("/v1/messages/count_tokens", ant_count.MessageCountTokensParams, {"messages": MSGS}),
]
PROBE = {"suffix": "tail", "best_of": 3}  # refused values of fields that are partly implemented
CASES = [(path, f, base) for path, td, base in ENDPOINTS for f in sorted(td.__annotations__)]


@pytest.mark.parametrize("path, field, base", CASES, ids=[f"{p}:{f}" for p, f, _ in CASES])
def test_every_schema_field_is_honoured_or_refused_by_name(server, path, field, base):
    if field in schema.DELEGATED:  # structured output and tools: validated by their own code
        return
    endpoint = next(k for k, v in PATHS.items() if v == path)
    if field in schema.FIELDS[endpoint] | set(schema.INFO):
        name = HONOURED[field].split(" ")[0]
        assert name in globals() or "test_serve_endpoints" in HONOURED[field], name
        if field not in PROBE:
            return
    body = {**base, field: PROBE.get(field, {"unsupported": True})}
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, (field, r.text)
    err = r.json()["error"]
    assert f"'{field}'" in err["message"]


PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "messages": "/v1/messages",
    "count_tokens": "/v1/messages/count_tokens",
}


def test_max_completion_tokens(oai):
    r = oai.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_completion_tokens=3,
        temperature=0,
        stop=["zzz"],
        extra_body=GREEDY,
    )
    assert r.usage.completion_tokens == 3
    chunks = oai.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=GREEDY,
    )
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [3]


def test_default_only_fields(server):
    base = {"messages": MSGS, "max_tokens": 2}
    ok = {"modalities": ["text"], "parallel_tool_calls": True}
    assert httpx.post(server.url + "/v1/chat/completions", json={**base, **ok}).status_code == 200
    for field, bad in (("modalities", ["audio"]), ("parallel_tool_calls", "x")):
        r = httpx.post(server.url + "/v1/chat/completions", json={**base, field: bad})
        assert r.status_code == 400 and f"'{field}'" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", json={**base, "thinking": {"type": "disabled"}})
    assert r.status_code == 200
    r = httpx.post(server.url + "/v1/messages", json={**base, "thinking": {"type": "enabled"}})
    assert r.status_code == 400 and "'thinking'" in r.json()["error"]["message"]
