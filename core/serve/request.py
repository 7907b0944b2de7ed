"""What the HTTP layer hands the engine, and what the engine sends back."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from llmkit.core.decode.sampling import SamplerParams

_ids = itertools.count(1)


@dataclass
class GenParams:
    max_tokens: int
    sampler: SamplerParams
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    speculative: bool = True  # per request: false turns MTP drafting off for this request
    id_slot: int | None = None  # run on this slot (llama.cpp's id_slot); None: any free slot
    cache_prompt: bool = True  # llama.cpp's switch: reuse cached prefix blocks for this prompt
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    grammar: str | None = None  # core/decode/grammar.py: the output must follow it (no drafting)


@dataclass
class Event:
    """kind: "text" (a delta), "done" (finish + usage) or "error" (message)."""

    kind: str
    text: str = ""
    finish: str = ""  # eog | stop_sequence | length
    stop_sequence: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict | None = None  # llama.cpp's per-response timings (incl. draft counts)
    # with GenParams.logprobs: the tokens behind this text delta, each
    # {"id", "logprob", "top": [(id, logprob), ...]} (see core/serve/logprobs.py)
    logprobs: list | None = None


@dataclass
class Request:
    prompt: list[int]
    params: GenParams
    emit: Callable[[Event], None]  # called from the engine thread
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False  # set by the HTTP side when the client goes away
    deferred: bool = False  # waited in the queue for KV blocks at least once
