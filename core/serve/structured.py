"""Structured output and tool calls on the wire: OpenAI `response_format`, llama.cpp's `grammar` /
`json_schema`, OpenAI and Anthropic `tools` / `tool_choice` -> a grammar for the engine (and the
prompt's messages); the generic tool answer (core/tools.py) -> `tool_calls` / `tool_use` blocks.
A constrained request runs without MTP drafting (the mask applies to sampled tokens only)."""

from __future__ import annotations

import json
from dataclasses import replace

from llmkit.core import tools as T
from llmkit.core.decode.grammar import compile_grammar
from llmkit.core.serve.fields import ApiError, text_content
from llmkit.errors import LlmkitError


def _fail(e: LlmkitError):
    raise ApiError(400, str(e)) from None


def output_schema(body: dict) -> tuple[str | None, dict | None]:
    """(grammar, the JSON schema it came from, if any) of response_format / grammar /
    json_schema; (None, None) for free text."""
    rf, gbnf, js = body.get("response_format"), body.get("grammar"), body.get("json_schema")
    given = [k for k, v in (("response_format", rf), ("grammar", gbnf), ("json_schema", js)) if v]
    if len(given) > 1:
        raise ApiError(400, f"give one of {', '.join(given)}, not several")
    schema = None
    try:
        if gbnf:
            if not isinstance(gbnf, str):
                raise ApiError(400, "'grammar' must be a string (a GBNF grammar)")
            return compile_grammar(gbnf=gbnf), None
        if js:
            if not isinstance(js, dict):
                raise ApiError(400, "'json_schema' must be an object (a JSON schema)")
            schema = js
        elif rf:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "text":
                return None, None
            if kind == "json_object":  # llama.cpp also takes a "schema" here
                schema = rf.get("schema") or {"type": "object"}
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
                    raise ApiError(400, "'response_format.json_schema' must be an object")
                schema = spec.get("schema") or {"type": "object"}
            else:
                raise ApiError(
                    400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'"
                )
            if not isinstance(schema, dict):
                raise ApiError(400, "'response_format' schema must be an object")
        if schema is None:
            return None, None
        return compile_grammar(json_schema=schema), schema
    except LlmkitError as e:
        _fail(e)


def constrain(params, grammar: str | None):
    """GenParams with the grammar set (and drafting off)."""
    if grammar is None:
        return params
    if params.ignore_eos:
        raise ApiError(400, "'ignore_eos' cannot be combined with a grammar or JSON schema")
    return replace(params, grammar=grammar, speculative=False)


# -- OpenAI ------------------------------------------------------------------------------------------
def openai_tools(body: dict) -> T.ToolSpec | None:
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    parallel = body.get("parallel_tool_calls", False)
    if not tools:
        if choice not in (None, "auto", "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'")
        return None
    try:
        checked = T.check_tools(tools)
    except LlmkitError as e:
        _fail(e)
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in [t["function"]["name"] for t in checked]:
            raise ApiError(400, "'tool_choice.function.name' must name one of the tools")
        choice = name
    elif choice is None:
        choice = "auto"
    elif choice not in ("auto", "none", "required"):
        raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or a function")
    if not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be a boolean")
    return None if choice == "none" else T.ToolSpec(checked, choice, parallel)


def openai_messages(body: dict) -> list[dict]:
    """Messages with tool calls and tool results (core/tools.py's shape)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array")
    roles = {"system": "system", "developer": "system", "user": "user"}
    roles.update({"assistant": "assistant", "tool": "tool"})
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(roles)}")
        msg = {"role": roles[m["role"]]}
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        content = m.get("content")
        msg["content"] = (
            "" if content is None and calls else text_content(content, f"messages[{i}]")
        )
        if calls:
            msg["tool_calls"] = [_openai_call(c, f"messages[{i}].tool_calls") for c in calls]
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                raise ApiError(400, f"messages[{i}]: a tool message needs a 'tool_call_id'")
            msg["tool_call_id"] = cid
        out.append(msg)
    return out


def _openai_call(c, where: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f"{where}: each call needs a function with a name")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise ApiError(400, f"{where}: function.arguments must be a JSON text") from None
    return {"id": str(c.get("id") or T.new_call_id()), "name": fn["name"], "arguments": args}


# -- Anthropic -----------------------------------------------------------------------------------------
def anthropic_tools(body: dict) -> T.ToolSpec | None:
    tools, choice = body.get("tools"), body.get("tool_choice") or {"type": "auto"}
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "'tools' must be an array of tool objects")
    as_openai = [
        {"type": "function", "function": {"name": t.get("name"), "parameters":
         t.get("input_schema", {"type": "object"}), **({"description": t["description"]}
         if "description" in t else {})}} for t in tools
    ]  # fmt: skip
    try:
        checked = T.check_tools(as_openai)
    except LlmkitError as e:
        _fail(e)
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "none":
        return None
    if kind == "tool":
        if choice.get("name") not in [t["function"]["name"] for t in checked]:
            raise ApiError(400, "'tool_choice.name' must name one of the tools")
        pick = choice["name"]
    elif kind in ("auto", "any"):
        pick = "auto" if kind == "auto" else "required"
    else:
        raise ApiError(400, "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'")
    parallel = not choice.get("disable_parallel_tool_use", True)
    return T.ToolSpec(checked, pick, parallel)


def anthropic_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array")
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": text_content(body["system"], "system")})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}: role must be 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages.{i}: content must be a string or an array of blocks")
        texts, calls = [], []
        for b in content:
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise ApiError(400, f"messages.{i}: a tool_use block needs a name and input")
                calls.append({"id": str(b.get("id") or T.new_call_id()), "name": b["name"],
                              "arguments": b.get("input", {})})  # fmt: skip
            elif kind == "tool_result" and m["role"] == "user":
                res = b.get("content", "")
                res = res if isinstance(res, str) else text_content(res, f"messages.{i}")
                out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id")),
                            "content": res})  # fmt: skip
            else:
                texts.append(text_content([b], f"messages.{i}"))
        if texts or calls:
            msg = {"role": m["role"], "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def tool_prompt(prompter, messages: list[dict], spec: T.ToolSpec | None) -> list[int]:
    """Prompt ids of a conversation with tools (or tool history)."""
    msgs = T.template_messages(messages, spec, prompter.template)
    try:
        return prompter.chat(msgs, spec.tools if spec else None)
    except LlmkitError as e:
        _fail(e)


def openai_chat(body: dict, prompter, params, plain_messages):
    """(prompt ids, params with the grammar, ToolSpec or None) of a chat request;
    `plain_messages(body)` reads messages when neither tools nor tool history are present."""
    grammar, schema = output_schema(body)
    spec = openai_tools(body)
    msgs = body.get("messages")
    history = isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in msgs
    )
    if spec is None and not history:
        return prompter.chat(plain_messages(body)), constrain(params, grammar), None
    prompt = tool_prompt(prompter, openai_messages(body), spec)
    if spec is None:
        return prompt, constrain(params, grammar), None
    try:
        grammar = T.tool_grammar(spec, schema)
    except LlmkitError as e:
        _fail(e)
    return prompt, constrain(params, grammar), spec


def anthropic_chat(body: dict, prompter, params, plain_messages):
    """Like openai_chat, for /v1/messages (llama.cpp's grammar / json_schema taken too)."""
    grammar, schema = output_schema(body)
    params = constrain(params, grammar)
    spec = anthropic_tools(body)
    msgs = body.get("messages")
    history = isinstance(msgs, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result")
                for b in m["content"])
        for m in msgs
    )  # fmt: skip
    if spec is None and not history:
        return prompter.chat(plain_messages(body)), params, None
    prompt = tool_prompt(prompter, anthropic_messages(body), spec)
    if spec is None:
        return prompt, params, None
    try:
        grammar = T.tool_grammar(spec, schema)
    except LlmkitError as e:
        _fail(e)
    return prompt, constrain(replace(params, grammar=None), grammar), spec
