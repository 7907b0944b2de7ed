"""Structured output and tool calls against a live `llm serve` on both real models, through the
official openai and anthropic clients: every constrained answer parses and validates."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from serve_util import live_server, sdk_clients

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
     "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "maximum": 999},
     "minItems": 1, "maxItems": 4}}, "required": ["xs"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
     "pop": {"type": "integer", "minimum": 0, "maximum": 99999999}, "capital": {"type": "boolean"}},
     "required": ["city", "pop", "capital"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {
     "x": {"type": "integer", "maximum": 999}, "y": {"type": "integer", "maximum": 999}}, "required": ["x", "y"]}},
     "required": ["p"]},
    {"type": "object", "properties": {"answer": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
     "required": ["answer"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "tags": {"type": "array",
     "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}, "required": ["n", "tags"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
     "maxItems": 5},
    {"type": "object", "properties": {"kind": {"const": "point"}, "v": {"anyOf": [
     {"type": "integer", "maximum": 999}, {"type": "null"}]}}, "required": ["kind", "v"]},
]  # fmt: skip
PROMPTS = ["Describe a person.", "Answer in JSON.", "Pick a colour.", "List some numbers.",
           "Tell me about Paris.", "Give a point.", "One word:", "Count things.", "Digits:",
           "A point, maybe."]  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
       "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999}, "b": {"type": "integer", "minimum": -999, "maximum": 999}}, "required": ["a", "b"]}}}  # fmt: skip


@pytest.fixture(scope="module", params=["smollm", "gemma"])
def server(request, smollm_gguf, gemma_gguf):
    path = smollm_gguf if request.param == "smollm" else gemma_gguf
    with live_server(path, n_slots=2, n_ctx=1024) as s:
        yield s


def _openai(server):

    return sdk_clients(server.url, "x")[0]


def test_json_schema_many_requests(server):
    """20 constrained requests (json_schema, llama.cpp's json_schema field, json_object, GBNF):
    every answer parses and validates."""
    client = _openai(server)
    for i, (schema, prompt) in enumerate(zip(SCHEMAS, PROMPTS)):
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
        }
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], response_format=fmt,
            max_tokens=200, temperature=0.7 if i % 2 else 0, seed=i,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        body = {"prompt": prompt, "json_schema": schema, "max_tokens": 200, "temperature": 0}
        out = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
        jsonschema.validate(json.loads(out["choices"][0]["text"]), schema)
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Some JSON please"}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0,
    )  # fmt: skip
    text = r.choices[0].message.content  # free-form: a small model may run to max_tokens
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    body = {"prompt": "Is it raining?", "grammar": 'root ::= ("yes" | "no") "!"', "max_tokens": 8}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert out["choices"][0]["text"] in ("yes!", "no!")


def test_structured_errors(server):
    client = _openai(server)
    import openai

    for extra in (
        {"grammar": "root ::= ("},
        {"response_format": {"type": "xml"}},
        {"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'},
        {"tools": [{"type": "function", "function": {"name": ""}}]},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                extra_body=extra,
            )  # fmt: skip


def _check_call(name, args, tool):
    assert name == tool["function"]["name"]
    jsonschema.validate(args, tool["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tools_required(server, stream):
    client = _openai(server)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        kw = dict(model="m", messages=msgs, tools=[WEATHER, ADD], tool_choice=choice,
                  max_tokens=120, temperature=0)  # fmt: skip
        tool = WEATHER if choice == "required" else ADD
        if not stream:
            r = client.chat.completions.create(**kw)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls"
            call = c.message.tool_calls[0]
            assert call.type == "function" and call.id
            name, args = call.function.name, json.loads(call.function.arguments)
        else:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
            name, args = deltas[0].function.name, json.loads(deltas[0].function.arguments)
        if choice == "required":
            tool = WEATHER if name == "get_weather" else ADD
        _check_call(name, args, tool)
    # the tool's result in a follow-up turn renders and the conversation goes on
    follow = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type":
         "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]  # fmt: skip
    r = client.chat.completions.create(model="m", messages=follow, tools=[WEATHER], max_tokens=60,
                                       temperature=0)  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason in ("stop", "tool_calls", "length")
    assert c.message.content or c.message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tools_any(server, stream):

    client = sdk_clients(server.url, "x")[1]
    tool = {"name": "get_weather", "description": "weather", "input_schema":
            WEATHER["function"]["parameters"]}  # fmt: skip
    kw = dict(model="m", max_tokens=120, tools=[tool], tool_choice={"type": "any"},
              messages=[{"role": "user", "content": "Weather in Rome?"}],
              extra_body={"temperature": 0})  # fmt: skip
    if stream:
        with client.messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    use = [b for b in msg.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, tool["input_schema"])
    follow = kw["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                           "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "18 degrees"}]},
    ]  # fmt: skip
    r = client.messages.create(model="m", max_tokens=40, tools=[tool], messages=follow,
                               extra_body={"temperature": 0})  # fmt: skip
    assert r.content
