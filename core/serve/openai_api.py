"""OpenAI wire format: /v1/completions and /v1/chat/completions bodies -> engine jobs, and engine
events -> responses / SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace

from llmkit.core.decode.sampling import SEED_MAX
from llmkit.core.serve import fields as F
from llmkit.core.serve import schema, structured
from llmkit.core.serve.fields import ApiError, Limits
from llmkit.core.serve.request import Event, GenParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token


@dataclass
class Job:
    prompt: list[int]
    params: GenParams
    stream: bool
    include_usage: bool
    chat: bool
    n: int = 1
    echo: str = ""  # completions with echo: the prompt text, prepended to every choice
    tools: object | None = None  # core/tools.py's ToolSpec (chat with tools)

    def choice_params(self, i: int) -> GenParams:
        """Choice i's parameters: a seeded request draws choice i from seed + i."""
        seed = self.params.sampler.seed
        if i == 0 or seed < 0:
            return self.params
        sampler = replace(self.params.sampler, seed=(seed + i) % (SEED_MAX + 1))
        return replace(self.params, sampler=sampler)


def _params(body: dict, limits: Limits, n_vocab: int) -> tuple[GenParams, bool, bool]:
    params = GenParams(
        max_tokens=F.max_tokens(body, ("max_tokens", "max_completion_tokens"), limits),
        sampler=F.sampler(body, n_vocab),
        stop=F.stop_list(body, "stop", limits),
        ignore_eos=F.get(body, "ignore_eos", bool, False),
        speculative=F.get(body, "speculative", bool, True),
        id_slot=F.get(body, "id_slot", int),
        cache_prompt=F.get(body, "cache_prompt", bool, True),
    )
    F.get(body, "model", str)  # any model name is served by the one model, but it is a string
    if "messages" not in body:  # chat requests take theirs with the tools (openai_chat)
        if body.get("tools"):
            raise ApiError(400, "'tools' is only supported by /v1/chat/completions")
        params = structured.constrain(params, structured.output_schema(body)[0])
    stream = F.get(body, "stream", bool, False)
    opts = F.get(body, "stream_options", dict, {})
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean")
    return params, stream, usage


def _n(body: dict) -> int:
    n = F.get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be between 1 and {MAX_N}")
    return n


def _with_logprobs(params: GenParams, k: int | None) -> GenParams:
    """Log-probabilities come from the plain sampling path: MTP drafting is off for the request."""
    return params if k is None else replace(params, logprobs=k, speculative=False)


def parse_completion(body: dict, prompter, limits: Limits) -> Job:
    schema.check(body, "completions")
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
    if F.get(body, "suffix", str):
        raise ApiError(400, "'suffix' is not supported by this server (fill-in-the-middle)")
    n = _n(body)
    best_of = F.get(body, "best_of", int)
    if best_of is not None and best_of != n:
        raise ApiError(400, "'best_of' is not supported by this server unless it equals 'n'")
    k = F.get(body, "logprobs", int)
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be between 0 and {MAX_LOGPROBS}")
    echo = F.get(body, "echo", bool, False)
    if echo and k is not None:
        raise ApiError(400, "'echo' with 'logprobs' is not supported (no prompt log-probabilities)")
    params, stream, usage = _params(body, limits, prompter.tok.n_vocab)
    text = "" if not echo else prompt if isinstance(prompt, str) else prompter.detokenize(ids)
    return Job(ids, _with_logprobs(params, k), stream, usage, False, n, text)


def chat_messages(body: dict) -> list[dict]:
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
    return out


def parse_chat(body: dict, prompter, limits: Limits) -> Job:
    schema.check(body, "chat")
    want = F.get(body, "logprobs", bool, False)
    k = F.get(body, "top_logprobs", int)
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}")
    if k and not want:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true")
    params, stream, usage = _params(body, limits, prompter.tok.n_vocab)
    params = _with_logprobs(params, (k or 0) if want else None)
    prompt, params, tools = structured.openai_chat(body, prompter, params, chat_messages)
    return Job(prompt, params, stream, usage, True, _n(body), tools=tools)


FINISH = {"eog": "stop", "stop_sequence": "stop", "length": "length"}


@dataclass
class Result:
    """One choice's whole answer: its text, its logprob entries (or None) and its done event."""

    text: str
    logprobs: list | None
    done: Event


class Formatter:
    def __init__(self, job: Job, model: str, tok):
        self.job, self.model, self.tok = job, model, tok
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = [len(job.echo)] * job.n  # completions' text_offset, per choice

    def _usage(self, dones: list[Event]) -> dict:
        """The prompt once (as OpenAI counts it for n > 1), the completions summed."""
        p, c = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _piece(self, tid: int) -> tuple[str, list[int]]:
        b = self.tok.token_to_piece(tid)
        return b.decode("utf-8", errors="replace"), list(b)

    def _logprobs(self, i: int, entries: list | None) -> dict | None:
        if entries is None:
            return None
        if self.job.chat:
            content = []
            for e in entries:
                text, raw = self._piece(e["id"])
                top = []
                for tid, lp in e["top"]:
                    t, r = self._piece(tid)
                    top.append({"token": t, "logprob": lp, "bytes": r})
                content.append({"token": text, "logprob": e["logprob"], "bytes": raw})
                content[-1]["top_logprobs"] = top
            return {"content": content, "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self._piece(e["id"])[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({self._piece(t)[0]: lp for t, lp in e["top"]})
            out["text_offset"].append(self.offset[i])
            self.offset[i] += len(text)
        return out

    def _head(self, chunk: bool) -> dict:
        obj = "chat.completion" if self.job.chat else "text_completion"
        obj += ".chunk" if chunk and self.job.chat else ""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, results: list[Result]) -> dict:
        choices = []
        for i, r in enumerate(results):
            c = {"index": i, "logprobs": self._logprobs(i, r.logprobs)}
            if self.job.chat:
                c["message"] = {"role": "assistant", "content": r.text}
            else:
                c["text"] = self.job.echo + r.text
            choices.append({**c, "finish_reason": FINISH[r.done.finish]})
        dones = [r.done for r in results]
        return {
            **self._head(False),
            "choices": choices,
            "usage": self._usage(dones),
            "timings": dones[0].timings,
        }

    def _chunk(self, i: int, delta, finish, logprobs=None) -> str:
        if self.job.chat:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**self._head(True), "choices": [choice]})

    def start(self) -> str:
        if self.job.chat:
            return "".join(
                self._chunk(i, {"role": "assistant", "content": ""}, None)
                for i in range(self.job.n)
            )
        if self.job.echo:
            return "".join(self._chunk(i, self.job.echo, None) for i in range(self.job.n))
        return ""

    def delta(self, i: int, ev: Event) -> str:
        lp = self._logprobs(i, ev.logprobs)
        return self._chunk(i, {"content": ev.text} if self.job.chat else ev.text, None, lp)

    def end(self, i: int, done: Event) -> str:
        return self._chunk(i, {} if self.job.chat else "", FINISH[done.finish])

    def close(self, dones: list[Event]) -> str:
        out = ""
        if self.job.include_usage:
            body = {"choices": [], "usage": self._usage(dones), "timings": dones[0].timings}
            out = sse({**self._head(True), **body})
        return out + "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_body(e: ApiError) -> dict:
    code = "invalid_api_key" if e.status == 401 else None
    return {"error": {"message": e.message, "type": e.kind, "param": None, "code": code}}
