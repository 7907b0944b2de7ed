"""OpenAI wire format: /v1/completions and /v1/chat/completions bodies -> engine jobs, and engine
events -> responses / SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from llmkit.core.serve import fields as F
from llmkit.core.serve.fields import ApiError, Limits
from llmkit.core.serve.request import Event, GenParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Job:
    prompt: list[int]
    params: GenParams
    stream: bool
    include_usage: bool
    chat: bool


def _params(body: dict, limits: Limits) -> tuple[GenParams, bool, bool]:
    if F.get(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' must be 1")
    for key in ("logprobs", "top_logprobs", "tools"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by this server")
    params = GenParams(
        max_tokens=F.max_tokens(body, ("max_tokens", "max_completion_tokens"), limits),
        sampler=F.sampler(body),
        stop=F.stop_list(body, "stop", limits),
        ignore_eos=F.get(body, "ignore_eos", bool, False),
        speculative=F.get(body, "speculative", bool, True),
        id_slot=F.get(body, "id_slot", int),
        cache_prompt=F.get(body, "cache_prompt", bool, True),
    )
    F.get(body, "model", str)  # any model name is served by the one model, but it is a string
    stream = F.get(body, "stream", bool, False)
    opts = F.get(body, "stream_options", dict, {})
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean")
    return params, stream, usage


def parse_completion(body: dict, prompter, limits: Limits) -> Job:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = prompter.text(prompt)
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        n_vocab = prompter.tok.n_vocab
        if not all(0 <= t < n_vocab for t in prompt):
            raise ApiError(400, f"'prompt' token ids must be between 0 and {n_vocab - 1}")
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string (or one array of token ids)")
    return Job(ids, *_params(body, limits), chat=False)


def parse_chat(body: dict, prompter, limits: Limits) -> Job:
    msgs = F.get(body, "messages", list, required=True)
    if not msgs:
        raise ApiError(400, "'messages' must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        out.append(
            {
                "role": ROLES[m["role"]],
                "content": F.text_content(m.get("content"), f"messages[{i}]"),
            }
        )
    return Job(prompter.chat(out), *_params(body, limits), chat=True)


FINISH = {"eog": "stop", "stop_sequence": "stop", "length": "length"}


class Formatter:
    def __init__(self, job: Job, model: str):
        self.job, self.model = job, model
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _usage(self, done: Event) -> dict:
        p, c = done.prompt_tokens, done.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def response(self, text: str, done: Event) -> dict:
        finish = FINISH[done.finish]
        if self.job.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion" if self.job.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(done),
            "timings": done.timings,
        }

    def _chunk(self, delta: str | None, finish: str | None, first: bool = False) -> str:
        if self.job.chat:
            d = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return sse({**body, "choices": [choice]})

    def start(self) -> str:
        return self._chunk(None, None, first=True) if self.job.chat else ""

    def delta(self, text: str) -> str:
        return self._chunk(text, None)

    def end(self, done: Event) -> str:
        out = self._chunk(None, FINISH[done.finish])
        if self.job.include_usage:
            obj = "chat.completion.chunk" if self.job.chat else "text_completion"
            out += sse(
                {
                    "id": self.id,
                    "object": obj,
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self._usage(done),
                    "timings": done.timings,
                }
            )
        return out + "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_body(e: ApiError) -> dict:
    code = "invalid_api_key" if e.status == 401 else None
    return {"error": {"message": e.message, "type": e.kind, "param": None, "code": code}}
