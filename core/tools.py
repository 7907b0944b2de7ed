"""Tool calling in llama.cpp's "Generic" format (common/chat.cpp), for any chat template.

The tools go to the chat template as its `tools` variable (llama.cpp --jinja); a template that does
not use them gets a system message describing them (minja's polyfill). Either way the answer is
constrained by a grammar to one JSON object:
    {"tool_call": {"name": ..., "arguments": {...}}}       a call (tool_choice auto / required)
    {"tool_calls": [{"name": ..., "arguments": {...}}]}    with parallel_tool_calls
    {"response": "..."}                                     a reply (tool_choice auto only)
and parsed back into calls. Earlier calls and tool results are rendered into the prompt: natively
when the template knows `tool_calls` / the "tool" role, else as that same JSON (calls) and as user
messages {"tool_response": {...}} (results).

Messages here are {"role", "content": str, "tool_calls": [{"id", "name", "arguments": dict}],
"tool_call_id", "name"}; tools are OpenAI-shaped {"type": "function", "function": {...}}.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from llmkit.errors import LlmkitError

RESPOND = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with "
    "`response` reply to the user's request"
)
RESPOND_CALL = "Respond in JSON format with `tool_call` (a request to call tools)"


@dataclass
class ToolSpec:
    tools: list[dict]  # OpenAI shape, validated
    choice: str = "auto"  # auto | required | a tool's name
    parallel: bool = False

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def check_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI `tools` validated: [{"type": "function", "function": {name, description?,
    parameters?}}] (parameters default to an empty object schema)."""
    if not isinstance(tools, list) or not tools:
        raise LlmkitError(f"'{where}' must be a non-empty array")
    out, seen = [], set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise LlmkitError(f"{where}[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise LlmkitError(f"{where}[{i}].function.name must be a string of 1 to 64 characters")
        if name in seen:
            raise LlmkitError(f"{where}: the tool name {name!r} appears twice")
        seen.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise LlmkitError(f"{where}[{i}].function.parameters must be a JSON schema object")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise LlmkitError(f"{where}[{i}].function.description must be a string")
        fn = {"name": name, "parameters": params, **({"description": desc} if desc else {})}
        out.append({"type": "function", "function": fn})
    return out


def _tool_schema(tool: dict, parallel: bool) -> dict:
    f = tool["function"]
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "const": f["name"]},
            "arguments": f["parameters"],
        },
        "required": ["name", "arguments"],
    }
    if parallel:
        schema["properties"]["id"] = {"type": "string", "minLength": 4}
        schema["required"].append("id")
    return schema


def answer_schema(spec: ToolSpec, response_schema: dict | None = None) -> dict:
    """The JSON schema of the answer (llama.cpp's generic format)."""
    tools = spec.tools
    if spec.choice not in ("auto", "required"):
        tools = [t for t in tools if t["function"]["name"] == spec.choice]
    calls = [_tool_schema(t, spec.parallel) for t in tools]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if spec.parallel:
        items = {"type": "array", "items": one, "minItems": 1}
        call = {"type": "object", "properties": {"tool_calls": items}, "required": ["tool_calls"]}
    else:
        call = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}
    if spec.choice != "auto":
        return call
    reply = {
        "type": "object",
        "properties": {"response": response_schema or {"type": "string"}},
        "required": ["response"],
    }
    return {"anyOf": [call, reply]}


def tool_grammar(spec: ToolSpec, response_schema: dict | None = None) -> str:
    from llmkit.core.decode.grammar import compile_grammar

    return compile_grammar(json_schema=answer_schema(spec, response_schema))


def template_messages(messages: list[dict], spec: ToolSpec | None, template: str) -> list[dict]:
    """`messages` as the chat template gets them: the generic format's system instructions
    added (with the tool list when the template ignores `tools`), calls and results polyfilled
    for a template that does not render them."""
    native_calls = "tool_calls" in template
    native_results = "'tool'" in template or '"tool"' in template
    names = {}
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            for c in calls:
                names[c["id"]] = c["name"]
            if native_calls:
                m["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls
                ]  # fmt: skip
            else:
                plain = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
                obj = {"tool_call": plain[0]} if len(plain) == 1 else {"tool_calls": plain}
                m["content"] = ((m.get("content") or "") + "\n" + json.dumps(obj)).strip()
        if m["role"] == "tool" and not native_results:
            cid = m.pop("tool_call_id", None)
            result = {"tool": m.pop("name", None) or names.get(cid), "content": m["content"]}
            if cid:
                result["tool_call_id"] = cid
            m = {"role": "user", "content": json.dumps({"tool_response": result})}
        m["content"] = m.get("content") or ""
        out.append(m)
    if spec is not None:
        text = RESPOND if spec.choice == "auto" else RESPOND_CALL
        if "tools" not in template:
            listing = json.dumps(spec.tools, indent=2)
            text = f"You can call any of the following tools to satisfy the user's requests: {listing}\n\n{text}"
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_answer(text: str) -> tuple[str | None, list[dict]]:
    """(reply text or None, calls [{"id", "name", "arguments": JSON text}]) of a generic-format
    answer; text that is not such JSON (a cut-off answer) comes back as the reply."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text, []
    if not isinstance(obj, dict):
        return text, []
    raw = obj.get("tool_calls") if "tool_calls" in obj else [obj.get("tool_call")]
    if "response" in obj and "tool_call" not in obj and "tool_calls" not in obj:
        r = obj["response"]
        return (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)), []
    calls = []
    for c in raw if isinstance(raw, list) else []:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return text, []
        args = c.get("arguments", {})
        calls.append(
            {
                "id": new_call_id(),
                "name": c["name"],
                "arguments": json.dumps(args, ensure_ascii=False),
            }
        )
    return (None, calls) if calls else (text, [])
