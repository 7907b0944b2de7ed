"""llama-server's utility endpoints beside the two APIs: /tokenize, /detokenize, /apply-template,
/props, /completion (native), /v1/embeddings, /v1/messages/count_tokens, and the chat page at /."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from llmkit.core.serve import anthropic_api, llama_api, openai_api, schema
from llmkit.core.serve import fields as F
from llmkit.core.serve.fields import ApiError
from llmkit.core.serve.page import PAGE
from llmkit.errors import LlmkitError

MAX_EMBED_INPUTS = 256


@dataclass
class Ctx:
    """What the routes need from create_app (app.py)."""

    engine: object
    prompter: object
    model_name: str
    limits: F.Limits
    authorize: object
    read_json: object
    parse: object
    run: object
    pooling: str = "mean"


def _ids(prompter, v, where: str, n_ctx: int) -> list[int]:
    n_vocab = prompter.tok.n_vocab
    if isinstance(v, str):
        if not v:
            raise ApiError(400, f"'{where}' must not be empty")
        ids = prompter.tok.encode(v, add_special=True, parse_special=False)
    elif isinstance(v, list) and v and all(type(t) is int for t in v):
        if not all(0 <= t < n_vocab for t in v):
            raise ApiError(400, f"'{where}' token ids must be between 0 and {n_vocab - 1}")
        ids = list(v)
    else:
        raise ApiError(400, f"'{where}' must be a non-empty string or array of token ids")
    if len(ids) > n_ctx:
        raise ApiError(400, f"'{where}' is {len(ids)} tokens; the context is {n_ctx} tokens")
    return ids


def embedding_inputs(body: dict, prompter, n_ctx: int) -> list[list[int]]:
    """OpenAI's input: a string, an array of strings, an array of token ids, or of such arrays."""
    schema.check(body, "embeddings")
    F.get(body, "model", str)
    v = body.get("input")
    if isinstance(v, str) or (isinstance(v, list) and v and all(type(t) is int for t in v)):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ApiError(400, "'input' must be a string or a non-empty array")
    if len(v) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"'input' may hold at most {MAX_EMBED_INPUTS} items")
    return [_ids(prompter, x, f"input[{i}]", n_ctx) for i, x in enumerate(v)]


def register(app: FastAPI, c: Ctx) -> None:
    engine, prompter, tok = c.engine, c.prompter, c.prompter.tok

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await c.read_json(request)
        content = F.get(body, "content", str, required=True)
        add_special = F.get(body, "add_special", bool, False)
        parse_special = F.get(body, "parse_special", bool, True)
        ids = tok.encode(content, add_special=add_special, parse_special=parse_special)
        if not F.get(body, "with_pieces", bool, False):
            return {"tokens": ids}
        out = []
        for t in ids:
            b = tok.token_to_piece(t)
            try:
                piece = b.decode("utf-8")
            except UnicodeDecodeError:  # llama.cpp: a piece that is not valid UTF-8 as its bytes
                piece = list(b)
            out.append({"id": t, "piece": piece})
        return {"tokens": out}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await c.read_json(request)
        ids = F.get(body, "tokens", list, [])
        if not all(type(t) is int and 0 <= t < tok.n_vocab for t in ids):
            raise ApiError(400, f"'tokens' must be token ids between 0 and {tok.n_vocab - 1}")
        return {"content": prompter.detokenize(ids)}

    @app.post("/apply-template")
    async def apply_template(request: Request):
        body = await c.read_json(request)
        try:
            return {"prompt": prompter.render(openai_api.chat_messages(body))}
        except LlmkitError as e:
            raise ApiError(400, str(e)) from None

    @app.get("/props")
    async def props(request: Request):
        c.authorize(request)
        d = engine.opts
        params = {
            "n_predict": c.limits.max_tokens,
            "temperature": 0.8,
            "top_k": 40,
            "top_p": 0.95,
            "min_p": 0.05,
            "repeat_penalty": 1.0,
            "repeat_last_n": 64,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": -1,
        }
        return {
            "default_generation_settings": {"n_ctx": d.n_ctx, "params": params},
            "total_slots": d.n_slots,
            "model_path": str(getattr(engine.lm, "path", "")),
            "chat_template": prompter.template,
            "build_info": "llmkit",
            "modalities": {"vision": False, "audio": False},
            "embedding_pooling": c.pooling,
        }

    @app.post("/completion")
    async def completion(request: Request):
        job = await c.parse(llama_api.parse_completion, await c.read_json(request))
        fmt = llama_api.Formatter(job, c.model_name, tok)
        return await c.run(request, job, fmt, lambda e: llama_api.sse(openai_api.error_body(e)))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        return await c.parse(anthropic_api.count_tokens, await c.read_json(request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await c.read_json(request)
        fmt = F.get(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'")
        n_embd = engine.model.config.n_embd
        dims = F.get(body, "dimensions", int)
        if dims is not None and dims != n_embd:
            raise ApiError(400, f"'dimensions' is not supported by this server (only {n_embd})")
        ids = await c.parse(lambda b, p, _l: embedding_inputs(b, p, engine.opts.n_ctx), body)
        fut = engine.call(lambda: engine.embed(ids, c.pooling))
        try:
            vecs = await asyncio.wrap_future(fut)
        except LlmkitError as e:
            raise ApiError(400, str(e)) from None
        data = []
        for i, v in enumerate(vecs):
            if fmt == "base64":
                v = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": v})
        n = sum(len(x) for x in ids)
        usage = {"prompt_tokens": n, "total_tokens": n}
        return JSONResponse({"object": "list", "data": data, "model": c.model_name, "usage": usage})
