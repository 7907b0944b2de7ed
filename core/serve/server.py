"""Build the engine and the app for a model, and run them on uvicorn (blocking, or in a
background thread for tests and benchmarks) on a socket we bind ourselves, so port 0 works."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass

import uvicorn

from llmkit.core.serve.app import create_app
from llmkit.core.serve.engine import Engine, ServeOptions
from llmkit.core.serve.metrics import Metrics
from llmkit.core.serve.prompt import Prompter
from llmkit.errors import LlmkitError


@dataclass
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    metrics: bool = False
    max_body_bytes: int = 1 << 20
    max_tokens: int | None = None  # largest max_tokens a request may ask for (default: -c)
    max_json_depth: int = 64  # deeper request bodies are refused (400)
    timeout_s: float = 60.0  # to receive a request body (else 408), and for each streamed send
    pooling: str = "mean"  # /v1/embeddings: mean, last or cls (llama.cpp's --pooling)
    chat_template: str | None = None  # --chat-template: a built-in name or jinja (else the file's)


class Server:
    def __init__(self, lm, tokenizer, opts: ServeOptions, http: HttpOptions, name: str):
        self.engine = Engine(lm, tokenizer, opts, Metrics(prometheus=http.metrics))
        self.prompter = Prompter(lm, tokenizer, http.chat_template)
        self.app = create_app(
            self.engine,
            self.prompter,
            name,
            http.api_key,
            http.metrics,
            http.max_body_bytes,
            http.max_tokens,
            http.max_json_depth,
            http.timeout_s,
            http.pooling,
        )
        self.http = http
        try:
            self.sock = socket.create_server((http.host, http.port))
        except OSError as e:
            raise LlmkitError(f"cannot listen on {http.host}:{http.port}: {e}") from None
        self.port = self.sock.getsockname()[1]
        cfg = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self.uv = uvicorn.Server(cfg)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.http.host}:{self.port}"

    def serve_forever(self) -> None:
        self.engine.start()
        print(f"llm serve: listening on {self.url}", file=sys.stderr, flush=True)
        try:
            self.uv.run(sockets=[self.sock])
        finally:
            self.engine.stop()

    def start(self, timeout: float = 30.0) -> Server:
        """Serve from a background thread; returns once the server accepts connections."""
        self.engine.start()
        self._thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]})
        self._thread.start()
        t0 = time.monotonic()
        while not self.uv.started:
            if time.monotonic() - t0 > timeout or not self._thread.is_alive():
                raise LlmkitError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.stop()
        self.sock.close()
