"""A live `llm serve` on loopback for tests: tiny model, OS-chosen port, clean shutdown."""

from __future__ import annotations

import contextlib
import time

import httpx
import torch

from llmkit.core.models.loader import load_model
from llmkit.core.serve.engine import ServeOptions
from llmkit.core.serve.server import HttpOptions, Server
from llmkit.core.tokenizer import load_tokenizer


@contextlib.contextmanager
def live_server(path, mtp=False, weight_dtype=torch.bfloat16, http=None, **opts):
    lm = load_model(path, mtp=mtp, weight_dtype=weight_dtype)
    tok = load_tokenizer(lm.metadata)
    http = http or HttpOptions(port=0, metrics=True)
    server = Server(lm, tok, ServeOptions(mtp=mtp, **opts), http, "tiny").start()
    try:
        yield server
    finally:
        server.stop()


def wait_idle(server, timeout=20.0) -> dict:
    """The engine's snapshot once no request is in a slot or queued."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        snap = server.engine.snapshot
        if snap["requests_processing"] == 0 and snap["requests_deferred"] == 0:
            return snap
        time.sleep(0.02)
    raise AssertionError(f"server not idle after {timeout} s: {server.engine.snapshot}")


def metric(server, name: str, headers=None) -> float:
    """Sum of a metric's samples (all label sets) from /metrics."""
    text = httpx.get(server.url + "/metrics", headers=headers or {}).text
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        return 0.0
    return total


def sdk_clients(url: str, key: str = "none"):
    """(openai.OpenAI, anthropic.Anthropic) for a live server, without retries (a failure shows
    at once)."""
    import anthropic
    import openai

    return (
        openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0),
        anthropic.Anthropic(base_url=url, api_key=key, max_retries=0),
    )
