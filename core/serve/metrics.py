"""Prometheus metrics with llama.cpp's names (prefix `llamacpp:`), one registry per server.

Counters count *completed* requests (the response was produced in full), so they equal what the
clients were sent; cancelled requests (client gone) are counted apart. Gauges are refreshed from
the engine's snapshot when /metrics is scraped. prometheus_client is imported only for a server
started with --metrics; otherwise the engine counts into plain in-process counters (`Stat`).
"""

from __future__ import annotations

from llmkit.errors import LlmkitError

P = "llamacpp:"


class Stat:
    """A counter or gauge without prometheus_client: inc/set/labels, the value in `.value`."""

    def __init__(self, *_args, **_kw):
        self.value = 0.0
        self.children: dict[tuple, Stat] = {}

    def inc(self, v: float = 1.0) -> None:
        self.value += v

    def set(self, v: float) -> None:
        self.value = v

    def labels(self, *values: str) -> Stat:
        return self.children.setdefault(values, Stat())


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise LlmkitError(
            "--metrics needs prometheus-client: pip install 'llmkit[serve]'"
        ) from None
    return prometheus_client


class Metrics:
    def __init__(self, prometheus: bool = False):
        if prometheus:
            pc = _prometheus()
            pc.disable_created_metrics()  # llama.cpp exposes no *_created series
            Counter, Gauge = pc.Counter, pc.Gauge
            r = self.registry = pc.CollectorRegistry()
        else:
            Counter = Gauge = Stat
            r = self.registry = None
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed.", registry=r)
        self.prompt_seconds = Counter(P + "prompt_seconds", "Prompt processing time.", registry=r)
        self.tokens_predicted = Counter(P + "tokens_predicted", "Generated tokens.", registry=r)
        self.tokens_predicted_seconds = Counter(
            P + "tokens_predicted_seconds", "Generation time.", registry=r
        )
        self.prompt_tokens_cached = Counter(
            P + "prompt_tokens_cached", "Prompt tokens taken from the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            P + "prefix_cache_hits", "Requests that reused cached prefix blocks.", registry=r
        )
        self.n_decode = Counter(P + "n_decode", "Batched decode forward passes.", registry=r)
        self.requests_completed = Counter(
            P + "requests_completed", "Requests answered in full.", registry=r
        )
        self.requests_cancelled = Counter(
            P + "requests_cancelled", "Requests whose client went away.", registry=r
        )
        self.requests_failed = Counter(
            P + "requests_failed", "Requests ended by an internal error (HTTP 500).", registry=r
        )
        self.requests_rejected = Counter(
            P + "requests_rejected", "Requests refused with 503: the queue was full.", registry=r
        )
        self.requests_processing = Gauge(
            P + "requests_processing", "Requests in a slot.", registry=r
        )
        self.requests_deferred = Gauge(
            P + "requests_deferred", "Requests waiting for a slot or KV blocks.", registry=r
        )
        self.deferrals = Counter(
            P + "requests_deferrals", "Times a queued request found no KV room.", registry=r
        )
        self.busy_slots_per_decode = Gauge(
            P + "n_busy_slots_per_decode", "Slots in the last decode step.", registry=r
        )
        g = ["group"]
        self.kv_blocks_total = Gauge(P + "kv_blocks_total", "KV pool blocks.", g, registry=r)
        self.kv_blocks_used = Gauge(P + "kv_blocks_used", "KV blocks in use.", g, registry=r)
        self.kv_blocks_cached = Gauge(
            P + "kv_blocks_cached", "Free KV blocks still holding a cached prefix.", g, registry=r
        )
        s = ["spec_type"]
        self.drafts = Counter(
            P + "speculative_drafts_generated", "Draft rounds with >= 1 token.", s, registry=r
        )
        self.drafts_accepted = Counter(
            P + "speculative_drafts_accepted", "Draft rounds with >= 1 accepted.", s, registry=r
        )
        self.draft_tokens = Counter(
            P + "speculative_draft_tokens_generated", "Draft tokens.", s, registry=r
        )
        self.draft_tokens_accepted = Counter(
            P + "speculative_draft_tokens_accepted", "Accepted draft tokens.", s, registry=r
        )
        self.accepted_per_pos = Counter(
            P + "speculative_accepted_tokens_per_pos",
            "Accepted draft tokens by draft position.",
            ["spec_type", "position"],
            registry=r,
        )
        self.n_draft = Gauge(
            P + "speculative_n_draft", "Draft length the policy chose last.", s, registry=r
        )

    def speculative_round(self, n_draft: int, n_accepted: int) -> None:
        if n_draft == 0:
            return
        self.drafts.labels("mtp").inc()
        self.draft_tokens.labels("mtp").inc(n_draft)
        if n_accepted:
            self.drafts_accepted.labels("mtp").inc()
            self.draft_tokens_accepted.labels("mtp").inc(n_accepted)
        for i in range(n_accepted):
            self.accepted_per_pos.labels("mtp", str(i)).inc()

    def refresh(self, snap: dict) -> None:
        self.requests_processing.set(snap["requests_processing"])
        self.requests_deferred.set(snap["requests_deferred"])
        for name, g in snap["kv"]["groups"].items():
            self.kv_blocks_total.labels(name).set(g["blocks_total"])
            self.kv_blocks_used.labels(name).set(g["blocks_used"])
            self.kv_blocks_cached.labels(name).set(g["blocks_cached"])

    def render(self) -> bytes:
        return _prometheus().generate_latest(self.registry)
