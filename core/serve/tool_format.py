"""Responses of requests with tools: the generic JSON answer (core/tools.py) becomes OpenAI
`tool_calls` (finish_reason "tool_calls") or Anthropic `tool_use` blocks (stop_reason "tool_use").
Streamed, the answer is held back until it is complete (it must be parsed whole), then sent as a
content delta or as one tool-call delta per call carrying its full arguments."""

from __future__ import annotations

import json

from llmkit.core import tools as T
from llmkit.core.serve import anthropic_api, openai_api
from llmkit.core.serve.request import Event


def formatter(api, job, model: str, tok):
    """The API's formatter for `job` (its tool-aware subclass when the job has tools)."""
    if getattr(job, "tools", None) is None:
        return api.Formatter(job, model, tok)
    return (OpenAITools if api is openai_api else AnthropicTools)(job, model, tok)


def _wire(c: dict) -> dict:
    return {"id": c["id"], "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]}}  # fmt: skip


class OpenAITools(openai_api.Formatter):
    def __init__(self, job, model: str, tok):
        super().__init__(job, model, tok)
        self.held = [[] for _ in range(job.n)]

    def response(self, results: list) -> dict:
        out = super().response(results)
        for choice, r in zip(out["choices"], results):
            content, calls = T.parse_answer(r.text)
            choice["message"] = {"role": "assistant", "content": content}
            if calls:
                choice["message"]["tool_calls"] = [_wire(c) for c in calls]
                choice["finish_reason"] = "tool_calls"
        return out

    def delta(self, i: int, ev: Event) -> str:
        self.held[i].append(ev.text)
        return ""

    def end(self, i: int, done: Event) -> str:
        content, calls = T.parse_answer("".join(self.held[i]))
        if calls:
            d = {"tool_calls": [{"index": k, **_wire(c)} for k, c in enumerate(calls)]}
            return self._chunk(i, d, None) + self._chunk(i, {}, "tool_calls")
        head = self._chunk(i, {"content": content}, None) if content else ""
        return head + super().end(i, done)


class AnthropicTools(anthropic_api.Formatter):
    def __init__(self, job, model: str, tok=None):
        super().__init__(job, model, tok)
        self.held: list[str] = []

    def _blocks(self, text: str) -> tuple[list[dict], bool]:
        content, calls = T.parse_answer(text)
        blocks = [{"type": "text", "text": content}] if content else []
        for c in calls:
            args = json.loads(c["arguments"])
            blocks.append({"type": "tool_use", "id": "toolu_" + c["id"][5:], "name": c["name"],
                           "input": args})  # fmt: skip
        return blocks, bool(calls)

    def response(self, results: list) -> dict:
        out = super().response(results)
        out["content"], called = self._blocks(results[0].text)
        if called:
            out["stop_reason"] = "tool_use"
        return out

    def start(self) -> str:
        n = len(self.job.prompt)
        msg = self._message([], None, None, {"input_tokens": n, "output_tokens": 0})
        ev = anthropic_api.event
        return ev("message_start", {"type": "message_start", "message": msg}) + ev(
            "ping", {"type": "ping"}
        )

    def delta(self, i: int, ev: Event) -> str:
        self.held.append(ev.text)
        return ""

    def end(self, i: int, done: Event) -> str:
        ev, out = anthropic_api.event, ""
        blocks, called = self._blocks("".join(self.held))
        for k, b in enumerate(blocks):
            if b["type"] == "text":
                start, d = {"type": "text", "text": ""}, {"type": "text_delta", "text": b["text"]}
            else:
                start = {**b, "input": {}}
                d = {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}
            out += ev(
                "content_block_start",
                {"type": "content_block_start", "index": k, "content_block": start},
            )
            out += ev(
                "content_block_delta", {"type": "content_block_delta", "index": k, "delta": d}
            )
            out += ev("content_block_stop", {"type": "content_block_stop", "index": k})
        stop = "tool_use" if called else anthropic_api.STOP[done.finish]
        delta = {"stop_reason": stop, "stop_sequence": done.stop_sequence}
        out += ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"output_tokens": done.completion_tokens},
            },
        )
        return out + ev("message_stop", {"type": "message_stop"})  # fmt: skip
