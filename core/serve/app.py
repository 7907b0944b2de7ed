"""The HTTP layer (FastAPI on uvicorn): authentication, bounded bodies, the two APIs' routes, SSE
streaming, and the bridge between the asyncio loop and the engine thread.

Errors are JSON in the API's own shape: OpenAI's {"error": {...}} everywhere, Anthropic's
{"type": "error", "error": {...}} under /v1/messages. A client that disconnects (mid-stream or while
waiting for a non-streamed answer) cancels its request; the engine frees its slot and blocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.core.serve import anthropic_api, openai_api, routes, tool_format
from llmkit.core.serve.engine import Engine, QueueFull
from llmkit.core.serve.fields import ApiError, Limits, json_depth
from llmkit.core.serve.openai_api import Result
from llmkit.core.serve.prompt import Prompter
from llmkit.core.serve.request import Event
from llmkit.core.serve.request import Request as GenRequest
from llmkit.errors import LlmkitError

RETRY_AFTER_S = 1  # the Retry-After of a 503 when the queue is full


def _digest(key: str) -> bytes:
    """Keys are compared as SHA-256 digests: constant time, and their length does not leak."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _parse_json(raw: bytes, max_depth: int) -> dict:
    depth = json_depth(raw, max_depth)
    if depth == "deep":
        raise ApiError(400, f"request body nests arrays/objects deeper than {max_depth} levels")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # not reached after json_depth; kept as a guard
        raise ApiError(400, "request body nests too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


class TimedStream(StreamingResponse):
    """A stream whose every send must complete within `timeout` seconds: a client that stops
    reading (its socket buffers full, the transport paused) is dropped, and closing the body
    generator cancels its request, instead of a coroutine waiting on it forever."""

    def __init__(self, content, timeout: float, **kw):
        super().__init__(content, **kw)
        self.timeout = timeout

    async def stream_response(self, send) -> None:
        async def timed(message) -> None:
            async with asyncio.timeout(self.timeout):
                await send(message)

        try:
            await super().stream_response(timed)
        except TimeoutError:  # uvicorn then closes the connection (response left incomplete)
            await self.body_iterator.aclose()


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def _error(request: Request, e: ApiError) -> JSONResponse:
    api = anthropic_api if _is_anthropic(request) else openai_api
    return JSONResponse(api.error_body(e), status_code=e.status, headers=e.headers)


def create_app(
    engine: Engine,
    prompter: Prompter,
    model_name: str,
    api_key: str | None = None,
    metrics: bool = False,
    max_body_bytes: int = 1 << 20,
    max_tokens: int | None = None,
    max_json_depth: int = 64,
    timeout_s: float = 60.0,
    pooling: str = "mean",
) -> FastAPI:
    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, openapi_url=None)
    # browsers may call the API from any page (as llama-server allows); keys still apply
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
    )
    limits = Limits(max_tokens=max_tokens or engine.opts.n_ctx)
    created = int(time.time())
    key_digest = _digest(api_key) if api_key is not None else b""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(request, ApiError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        import traceback

        traceback.print_exception(e, file=sys.stderr)  # the log gets the details, the client not
        msg = "internal error in this request (the server log has the details)"
        return _error(request, ApiError(500, msg, "api_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if given is None or not hmac.compare_digest(_digest(given), key_digest):
            kind = "authentication_error"
            raise ApiError(401, "invalid or missing API key", kind)

    async def read_json(request: Request) -> dict:
        authorize(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"request body exceeds {max_body_bytes} bytes", "request_too_large")
        chunks, n = [], 0
        try:
            async with asyncio.timeout(timeout_s):  # a client that sends the body slowly
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > max_body_bytes:
                        raise ApiError(413, f"request body exceeds {max_body_bytes} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"request body not received within {timeout_s:g} s") from None
        return await run_in_threadpool(_parse_json, b"".join(chunks), max_json_depth)

    def submit(job) -> tuple[list[GenRequest], asyncio.Queue]:
        """The job's n choices as n engine requests, their events into one queue as (i, event)."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(i: int):
            def emit(ev: Event) -> None:  # engine thread -> this request's queue
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (i, ev))
                except RuntimeError:  # the loop is gone (server shutting down)
                    pass

            return emit

        reqs = []
        try:
            for i in range(job.n):
                reqs.append(GenRequest(job.prompt, job.choice_params(i), emitter(i)))
                engine.submit(reqs[-1])
        except QueueFull as e:
            for r in reqs[:-1]:
                engine.cancel(r)
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            raise ApiError(503, str(e), "overloaded_error", retry) from None
        except LlmkitError as e:
            for r in reqs[:-1]:
                engine.cancel(r)
            raise ApiError(400, str(e)) from None
        return reqs, q

    def cancel_all(reqs: list[GenRequest]) -> None:
        for r in reqs:
            engine.cancel(r)

    async def collect(request: Request, reqs: list[GenRequest], q: asyncio.Queue):
        """Wait for every choice's whole answer; None if the client went away first (its requests
        cancelled)."""

        async def gone():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.create_task(gone())
        parts = [[] for _ in reqs]
        lps: list = [None] * len(reqs)
        results: list = [None] * len(reqs)
        try:
            while any(r is None for r in results):
                getter = asyncio.ensure_future(q.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    cancel_all(reqs)
                    return None
                i, ev = getter.result()
                if ev.kind == "text":
                    parts[i].append(ev.text)
                    if ev.logprobs is not None:
                        lps[i] = (lps[i] or []) + ev.logprobs
                elif ev.kind == "error":
                    cancel_all(reqs)
                    raise ApiError(500, ev.text, "api_error")
                else:
                    has_lp = reqs[i].params.logprobs is not None
                    results[i] = Result("".join(parts[i]), lps[i] or ([] if has_lp else None), ev)
            return results
        finally:
            watcher.cancel()

    def stream(request: Request, reqs: list[GenRequest], q: asyncio.Queue, fmt, error_chunk):
        async def gone():
            # the client hung up: cancel now, not at the next chunk sent. Starlette already does
            # this for ASGI servers below spec 2.4 (uvicorn today); from 2.4 on it only notices
            # at a failed send, which may never come for a request still waiting in the queue
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel_all(reqs)
            q.put_nowait(None)

        async def gen():
            watcher = asyncio.create_task(gone())
            dones: list = [None] * len(reqs)
            try:
                yield fmt.start()
                while any(d is None for d in dones):
                    item = await q.get()
                    if item is None:
                        return
                    i, ev = item
                    if ev.kind == "text":
                        yield fmt.delta(i, ev)
                    elif ev.kind == "error":
                        yield error_chunk(ApiError(500, ev.text, "api_error"))
                        return
                    else:
                        dones[i] = ev
                        yield fmt.end(i, ev)
                yield fmt.close(dones)
            finally:  # also runs when the client disconnects (the task is cancelled)
                watcher.cancel()
                cancel_all(reqs)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return TimedStream(gen(), timeout_s, media_type="text/event-stream", headers=headers)

    async def run(request: Request, job, fmt, error_chunk):
        reqs, q = submit(job)
        if job.stream:
            return stream(request, reqs, q, fmt, error_chunk)
        got = await collect(request, reqs, q)
        if got is None:
            return Response(status_code=499)
        return JSONResponse(fmt.response(got))

    async def parse(fn, body):
        # templates and tokenization of up to max_body_bytes run off the event loop
        try:
            return await run_in_threadpool(fn, body, prompter, limits)
        except LlmkitError as e:  # e.g. a chat template that raised
            raise ApiError(400, str(e)) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        job = await parse(openai_api.parse_completion, await read_json(request))
        fmt = openai_api.Formatter(job, model_name, prompter.tok)
        return await run(request, job, fmt, lambda e: openai_api.sse(openai_api.error_body(e)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        job = await parse(openai_api.parse_chat, await read_json(request))
        fmt = tool_format.formatter(openai_api, job, model_name, prompter.tok)
        return await run(request, job, fmt, lambda e: openai_api.sse(openai_api.error_body(e)))

    @app.post("/v1/messages")
    async def messages(request: Request):
        job = await parse(anthropic_api.parse_messages, await read_json(request))
        fmt = tool_format.formatter(anthropic_api, job, model_name, prompter.tok)
        err = lambda e: anthropic_api.event("error", anthropic_api.error_body(e))  # noqa: E731
        return await run(request, job, fmt, err)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "llmkit"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        snap = engine.snapshot
        n = len(snap["slots"])
        return {
            "status": "ok",
            "slots_idle": n - snap["requests_processing"],
            "slots_processing": snap["requests_processing"],
        }

    @app.get("/slots")
    async def slots(request: Request):
        authorize(request)
        return engine.snapshot

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        authorize(request)
        if not metrics:
            raise ApiError(501, "metrics are disabled: start the server with --metrics")
        from prometheus_client import CONTENT_TYPE_LATEST

        engine.metrics.refresh(engine.snapshot)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    ctx = routes.Ctx(
        engine, prompter, model_name, limits, authorize, read_json, parse, run, pooling
    )
    routes.register(app, ctx)
    return app
