"""core/tools.py: llama.cpp's generic tool-call format: tool validation, the answer schema, the
prompt polyfills for templates without tool support, and parsing answers back into calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llmkit.core import tools as T
from llmkit.core.tokenizer.chat import CHATML, render_chat
from llmkit.errors import LlmkitError

ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}  # fmt: skip
NOW = {"type": "function", "function": {"name": "now"}}


@pytest.mark.parametrize(
    "tools, msg",
    [
        ([], "non-empty"),
        ([{"type": "x"}], "must be"),
        ([{"type": "function", "function": {"name": ""}}], "name must be"),
        ([ADD, ADD], "appears twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": 3}}], "JSON schema"),
    ],
)
def test_check_tools_refuses(tools, msg):
    with pytest.raises(LlmkitError, match=msg):
        T.check_tools(tools)


def test_answer_schema_shapes():
    spec = T.ToolSpec(T.check_tools([ADD, NOW]), "auto")
    s = T.answer_schema(spec)
    jsonschema.validate({"response": "hi"}, s)
    jsonschema.validate({"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}, s)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_call": {"name": "add", "arguments": {"a": "x", "b": 2}}}, s)
    req = T.answer_schema(T.ToolSpec(spec.tools, "required"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "hi"}, req)
    one = T.answer_schema(T.ToolSpec(spec.tools, "now"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}, one)
    par = T.answer_schema(T.ToolSpec(spec.tools, "required", parallel=True))
    jsonschema.validate({"tool_calls": [{"name": "now", "arguments": {}, "id": "abcd"}]}, par)
    assert T.tool_grammar(spec)  # llguidance compiles it


def test_parse_answer():
    content, calls = T.parse_answer('{"tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}')
    assert content is None and calls[0]["name"] == "add"
    assert json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}
    assert calls[0]["id"].startswith("call_")
    two = '{"tool_calls": [{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}]}'
    _, calls = T.parse_answer(two)
    assert len(calls) == 2 and calls[0]["id"] != calls[1]["id"]
    assert T.parse_answer('{"response": "hello"}') == ("hello", [])
    assert T.parse_answer('{"tool_call": {"na') == ('{"tool_call": {"na', [])  # cut off


def test_template_polyfills_render():
    """A template without tool support (ChatML) gets the tool list in a system message, earlier
    calls as the generic JSON, and results as user messages; a native template gets `tools`."""
    spec = T.ToolSpec(T.check_tools([ADD]), "auto")
    msgs = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_9", "name": "add", "arguments": {"a": 1, "b": 2}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "3"},
    ]  # fmt: skip
    out = T.template_messages(msgs, spec, CHATML)
    assert out[0]["role"] == "system" and '"name": "add"' in out[0]["content"]
    assert T.RESPOND in out[0]["content"]
    assert json.loads(out[2]["content"]) == {
        "tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}
    }
    assert out[3]["role"] == "user"
    assert json.loads(out[3]["content"])["tool_response"] == {
        "tool": "add", "content": "3", "tool_call_id": "call_9"}  # fmt: skip
    text = render_chat(CHATML, out)
    assert "tool_response" in text and "<|im_start|>assistant\n" in text
    native = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    out = T.template_messages(msgs[:1], spec, native)
    assert '"name": "add"' not in out[0]["content"]  # the template lists the tools itself
    assert render_chat(native, out, tools=spec.tools).startswith("[add]")
