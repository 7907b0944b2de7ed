"""OpenAI-shaped completions on a loaded `LLM` (llama-cpp-python's methods and dicts).

    lm = llmkit.load("smollm2-135m")
    out = lm.create_completion("The capital of France is", max_tokens=8, temperature=0)
    out["choices"][0]["text"]
    for chunk in lm.create_chat_completion([{"role": "user", "content": "Hi"}], stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

`LLM` (core/api.py) inherits these methods from `Completions`; they rely on its `tokenize`,
`chat_prompt`, `generate_ids`, `tokenizer` and `lm`. `TextStream` (token ids -> UTF-8 text) and
`sampler_params` (keyword options -> validated `SamplerParams`) live here for both.
"""

from __future__ import annotations

import codecs
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields

from llmkit.core.decode.sampling import SamplerParams, log_softmax, top_k
from llmkit.errors import LlmkitError


class TextStream:
    """Token ids in, text pieces out; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token: int) -> str:
        return self.dec.decode(self.tok.token_to_piece(token))

    def end(self) -> str:
        return self.dec.decode(b"", final=True)


def sampler_params(**sampling) -> SamplerParams:
    known = {f.name for f in fields(SamplerParams)}
    bad = sorted(set(sampling) - known)
    if bad:
        raise LlmkitError(f"unknown sampling option(s) {', '.join(bad)} (known: {sorted(known)})")
    p = SamplerParams(**sampling)
    p.validate()
    return p


class StopStrings:
    """Text pieces in, text out, cut before the first stop string; holds back a tail that could
    still grow into one."""

    def __init__(self, stop: str | list[str] | None):
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stop):
            raise LlmkitError("stop must be a string or a list of strings")
        self.stop = [s for s in stop if s]
        self.buf = ""
        self.hit = False

    def put(self, piece: str) -> str:
        self.buf += piece
        cut = min((i for i in (self.buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = 0  # the longest tail of buf that begins some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(out) :]
        return out

    def end(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _logit_bias(bias) -> dict[int, float]:
    """OpenAI's {"token id" (a string or int): bias} -> {int: float}."""
    try:
        return {int(k): float(v) for k, v in (bias or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise LlmkitError("logit_bias must map token ids to numbers") from None


class Completions:
    """create_completion / create_chat_completion / embed, for `LLM`."""

    def _sampling(self, temperature, top_p, top_k, min_p, repeat_penalty, presence_penalty,
                  frequency_penalty, logit_bias, seed) -> dict:  # fmt: skip
        s = dict(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repeat_penalty=repeat_penalty, seed=-1 if seed is None else seed)  # fmt: skip
        # only when used: a sampler without these fields still serves every other request
        if presence_penalty:
            s["presence_penalty"] = presence_penalty
        if frequency_penalty:
            s["frequency_penalty"] = frequency_penalty
        if logit_bias:
            s["logit_bias"] = _logit_bias(logit_bias)
        return s

    def _run(self, ids, max_tokens, stop, sampling, logprobs) -> Iterator[tuple]:
        """Yield (text piece, logprob entry or None); the last item is (None, finish_reason,
        completion token count)."""
        if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
            raise LlmkitError(f"logprobs must be an integer in [0, 20], got {logprobs!r}")
        n_predict = -1 if max_tokens is None or max_tokens <= 0 else int(max_tokens)
        params = sampler_params(**sampling)
        stops, text = StopStrings(stop), TextStream(self.tokenizer)
        record = [] if logprobs is not None else None
        gen = self.generate_ids(ids, params, n_predict, logits_hook=_hook(record, logprobs))
        n = 0
        try:
            for t in gen:
                n += 1
                out = stops.put(text.put(t))
                yield out, self._logprob_entry(t, record, logprobs)
                if stops.hit:
                    break
        finally:
            gen.close()
        if not stops.hit:
            yield stops.put(text.end()) + stops.end(), None
        reason = "stop" if stops.hit or self.stats.stop_reason == "eog" else "length"
        yield None, reason, n

    def _logprob_entry(self, token, record, k):
        if record is None or not record:
            return None
        lp, top = record.pop()
        piece = self.tokenizer.token_to_piece(token).decode("utf-8", "replace")
        tops = {self.tokenizer.token_to_piece(i).decode("utf-8", "replace"): v for i, v in top[:k]}
        return piece, float(lp[token]), tops

    def create_completion(
        self, prompt: str | list[int], max_tokens: int | None = 16, temperature: float = 0.8,
        top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, stop=None,
        seed: int | None = None, stream: bool = False, echo: bool = False,
        logprobs: int | None = None, repeat_penalty: float = 1.0, presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0, logit_bias: dict | None = None,
    ) -> dict | Iterator[dict]:  # fmt: skip
        """OpenAI `text_completion` dict (or, with stream=True, an iterator of chunks whose
        texts join to the same text). max_tokens None or <= 0: until EOS or a full context."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        prompt_text = prompt if isinstance(prompt, str) else self.detokenize(ids)
        sampling = self._sampling(temperature, top_p, top_k, min_p, repeat_penalty,
                                  presence_penalty, frequency_penalty, logit_bias, seed)  # fmt: skip
        head = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion",
                "created": int(time.time()), "model": str(self.lm.path)}  # fmt: skip
        items = self._run(ids, max_tokens, stop, sampling, logprobs)
        if stream:
            return self._completion_chunks(head, items, prompt_text if echo else "", logprobs)
        text, entries, reason, n = prompt_text if echo else "", [], None, 0
        for item in items:
            if item[0] is None:
                reason, n = item[1], item[2]
            else:
                text += item[0]
                entries += [item[1]] if item[1] else []
        choice = {"text": text, "index": 0, "logprobs": _logprobs(entries, logprobs),
                  "finish_reason": reason}  # fmt: skip
        return {**head, "choices": [choice], "usage": _usage(len(ids), n)}

    def _completion_chunks(self, head, items, first, logprobs) -> Iterator[dict]:
        def chunk(text, entry=None, reason=None):
            lp = _logprobs([entry], logprobs) if entry else None
            c = {"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}
            return {**head, "choices": [c]}

        if first:
            yield chunk(first)
        for item in items:
            if item[0] is None:
                yield chunk("", reason=item[1])
            elif item[0] or item[1]:
                yield chunk(item[0], item[1])

    def create_chat_completion(
        self, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.2,
        top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, stop=None,
        seed: int | None = None, stream: bool = False, repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        logit_bias: dict | None = None,
    ) -> dict | Iterator[dict]:  # fmt: skip
        """OpenAI `chat.completion` dict for `messages` rendered with the chat template (or, with
        stream=True, `chat.completion.chunk` dicts: a role delta, content deltas, a last empty
        delta with the finish_reason)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise LlmkitError("messages must be a list of {'role', 'content'} dicts")
        ids = self.chat_prompt(messages)
        sampling = self._sampling(temperature, top_p, top_k, min_p, repeat_penalty,
                                  presence_penalty, frequency_penalty, logit_bias, seed)  # fmt: skip
        head = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()),
                "model": str(self.lm.path)}  # fmt: skip
        items = self._run(ids, max_tokens, stop, sampling, None)
        if stream:
            return _chat_chunks(head, items)
        text, reason, n = "", None, 0
        for item in items:
            if item[0] is None:
                reason, n = item[1], item[2]
            else:
                text += item[0]
        msg = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": reason}
        return {"id": head["id"], "object": "chat.completion", **head, "choices": [choice],
                "usage": _usage(len(ids), n)}  # fmt: skip

    def embed(self, texts: str | list[str], pooling: str = "mean", normalize: bool = True):
        """Embedding vector(s) of a text or a list of texts (core/embed.py)."""
        try:
            from llmkit.core.embed import embed
        except ImportError:
            raise LlmkitError(
                "embeddings are not available in this build (no core/embed.py)"
            ) from None
        one = isinstance(texts, str)
        items = [texts] if one else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise LlmkitError("embed takes a string or a non-empty list of strings")
        vecs = embed(self.lm, [self.tokenize(t) for t in items], pooling, normalize)
        return vecs[0] if one else vecs


def _hook(record, k):
    """A logits observer that queues (log-probabilities, top-k (id, logprob)) per sampled token
    (of the logits after bias and penalties, before temperature and the filters)."""
    if record is None:
        return None

    def hook(logits):  # the sampler's adjusted logits: a host fp32 vector
        lp = log_softmax(logits)
        vals, ids = top_k(lp, max(1, k))
        record.insert(0, (lp, list(zip(ids.tolist(), vals.tolist(), strict=True))))

    return hook


def _logprobs(entries, k):
    if k is None:
        return None
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    offset = 0
    for piece, lp, tops in entries:
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        out["token_logprobs"].append(lp if math.isfinite(lp) else None)
        out["top_logprobs"].append(tops)
        offset += len(piece)
    return out


def _usage(n_prompt: int, n_gen: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
            "total_tokens": n_prompt + n_gen}  # fmt: skip


def _chat_chunks(head, items) -> Iterator[dict]:
    def chunk(delta, reason=None):
        c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": head["id"], "object": "chat.completion.chunk", **head, "choices": [c]}

    yield chunk({"role": "assistant"})
    for item in items:
        if item[0] is None:
            yield chunk({}, item[1])
        elif item[0]:
            yield chunk({"content": item[0]})
