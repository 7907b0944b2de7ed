"""llama.cpp's native /completion: {"prompt", "n_predict", "stream", sampling fields...} ->
{"content", "stop", "tokens_predicted", "tokens_evaluated", "timings", ...}; streamed as SSE
`data: {...}` chunks, the last one with "stop": true and the totals (no [DONE], as llama.cpp)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from llmkit.core.serve import fields as F
from llmkit.core.serve import schema, structured
from llmkit.core.serve.fields import ApiError, Limits
from llmkit.core.serve.request import Event, GenParams

MAX_PROBS = 20
STOP_TYPE = {"eog": "eos", "stop_sequence": "word", "length": "limit"}


@dataclass
class Job:
    prompt: list[int]
    params: GenParams
    stream: bool
    n: int = 1

    def choice_params(self, i: int) -> GenParams:
        return self.params


def parse_completion(body: dict, prompter, limits: Limits) -> Job:
    schema.check(body, "llama_completion")
    prompt = body.get("prompt")
    n_vocab = prompter.tok.n_vocab
    if isinstance(prompt, str):
        ids = prompter.text(prompt)
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t < n_vocab for t in prompt):
            raise ApiError(400, f"'prompt' token ids must be between 0 and {n_vocab - 1}")
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or an array of token ids")
    n = F.get(body, "n_predict", int, -1)
    if n == -1:  # llama.cpp: until the end of generation (here: the server's max_tokens)
        n = limits.max_tokens
    if not 1 <= n <= limits.max_tokens:
        raise ApiError(400, f"'n_predict' must be -1 or between 1 and {limits.max_tokens}")
    params = GenParams(
        max_tokens=n,
        sampler=F.sampler(body, n_vocab),
        stop=F.stop_list(body, "stop", limits),
        ignore_eos=F.get(body, "ignore_eos", bool, False),
        speculative=F.get(body, "speculative", bool, True),
        id_slot=F.get(body, "id_slot", int),
        cache_prompt=F.get(body, "cache_prompt", bool, True),
    )
    k = F.get(body, "n_probs", int, 0)
    if not 0 <= k <= MAX_PROBS:
        raise ApiError(400, f"'n_probs' must be between 0 and {MAX_PROBS}")
    if k:  # log-probabilities come from the plain sampling path: no MTP drafting
        params = replace(params, logprobs=k, speculative=False)
    if body.get("tools"):
        raise ApiError(400, "'tools' is only supported by /v1/chat/completions and /v1/messages")
    params = structured.constrain(params, structured.output_schema(body)[0])
    return Job(ids, params, F.get(body, "stream", bool, False))


class Formatter:
    def __init__(self, job: Job, model: str, tok):
        self.job, self.model, self.tok = job, model, tok

    def _probs(self, entries: list | None) -> list:
        def one(tid: int, lp: float) -> dict:
            b = self.tok.token_to_piece(tid)
            return {
                "id": tid,
                "token": b.decode("utf-8", "replace"),
                "logprob": lp,
                "bytes": list(b),
            }

        out = []
        for e in entries or []:
            d = one(e["id"], e["logprob"])
            d["top_logprobs"] = [one(t, lp) for t, lp in e["top"]]
            out.append(d)
        return out

    def _final(self, content: str, done: Event, entries: list | None) -> dict:
        p = self.job.params.sampler
        out = {
            "content": content,
            "id_slot": (done.timings or {}).get("id_slot", 0),
            "stop": True,
            "model": self.model,
            "tokens_predicted": done.completion_tokens,
            "tokens_evaluated": done.prompt_tokens,
            "generation_settings": {
                "n_predict": self.job.params.max_tokens,
                "temperature": p.temp,
                "top_k": p.top_k,
                "top_p": p.top_p,
                "min_p": p.min_p,
                "seed": p.seed,
                "stop": self.job.params.stop,
            },
            "stop_type": STOP_TYPE[done.finish],
            "stopping_word": done.stop_sequence or "",
            "truncated": False,
            "timings": done.timings,
        }
        if self.job.params.logprobs:
            out["completion_probabilities"] = self._probs(entries)
        return out

    def response(self, results: list) -> dict:
        r = results[0]
        return self._final(r.text, r.done, r.logprobs)

    def start(self) -> str:
        return ""

    def delta(self, i: int, ev: Event) -> str:
        d = {"content": ev.text, "stop": False}
        if self.job.params.logprobs:
            d["completion_probabilities"] = self._probs(ev.logprobs)
        return sse(d)

    def end(self, i: int, done: Event) -> str:
        return sse(self._final("", done, []))

    def close(self, dones: list) -> str:
        return ""


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
