"""Anthropic Messages wire format: /v1/messages bodies -> engine jobs, events -> the message
object or its stream of named SSE events."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from llmkit.core.serve import fields as F
from llmkit.core.serve import schema, structured
from llmkit.core.serve.fields import ApiError, Limits
from llmkit.core.serve.request import Event, GenParams


@dataclass
class Job:
    prompt: list[int]
    params: GenParams
    stream: bool
    n: int = 1  # one choice: Anthropic has no n
    tools: object | None = None  # core/tools.py's ToolSpec

    def choice_params(self, i: int) -> GenParams:
        return self.params


def chat_messages(body: dict) -> list[dict]:
    """The request's system prompt and messages, as the chat template's messages."""
    F.get(body, "model", str)
    msgs = F.get(body, "messages", list, required=True)
    if not msgs:
        raise ApiError(400, "'messages' must not be empty")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": F.text_content(system, "system")})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}: role must be 'user' or 'assistant'")
        out.append(
            {"role": m["role"], "content": F.text_content(m.get("content"), f"messages.{i}")}
        )
    return out


def count_tokens(body: dict, prompter, limits: Limits) -> dict:
    schema.check(body, "count_tokens")
    return {"input_tokens": len(prompter.chat(chat_messages(body)))}


def parse_messages(body: dict, prompter, limits: Limits) -> Job:
    schema.check(body, "messages")
    params = GenParams(
        max_tokens=F.max_tokens(body, ("max_tokens",), limits, required=True),
        sampler=F.sampler(body),
        stop=F.stop_list(body, "stop_sequences", limits),
        ignore_eos=F.get(body, "ignore_eos", bool, False),
        speculative=F.get(body, "speculative", bool, True),
        id_slot=F.get(body, "id_slot", int),
        cache_prompt=F.get(body, "cache_prompt", bool, True),
    )
    prompt, params, tools = structured.anthropic_chat(body, prompter, params, chat_messages)
    return Job(prompt, params, F.get(body, "stream", bool, False), tools=tools)


STOP = {"eog": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens"}


class Formatter:
    def __init__(self, job: Job, model: str, tok=None):
        self.job, self.model = job, model
        self.id = "msg_" + uuid.uuid4().hex[:24]

    def _message(self, content: list, stop: str | None, seq: str | None, usage: dict) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": seq,
            "usage": usage,
        }

    def response(self, results: list) -> dict:
        text, done = results[0].text, results[0].done
        usage = {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens}
        return self._message(
            [{"type": "text", "text": text}], STOP[done.finish], done.stop_sequence, usage
        )

    def start(self) -> str:
        n = len(self.job.prompt)
        msg = self._message([], None, None, {"input_tokens": n, "output_tokens": 0})
        block = {"type": "text", "text": ""}
        return (
            event("message_start", {"type": "message_start", "message": msg})
            + event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            + event("ping", {"type": "ping"})
        )

    def delta(self, i: int, ev: Event) -> str:
        d = {"type": "text_delta", "text": ev.text}
        return event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})

    def close(self, dones: list[Event]) -> str:
        return ""

    def end(self, i: int, done: Event) -> str:
        delta = {"stop_reason": STOP[done.finish], "stop_sequence": done.stop_sequence}
        return (
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": {"output_tokens": done.completion_tokens},
                },
            )
            + event("message_stop", {"type": "message_stop"})
        )


def event(name: str, obj: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    500: "api_error",
    503: "overloaded_error",
}


def error_body(e: ApiError) -> dict:
    kind = KINDS.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}
