"""Which request fields each endpoint honours: a field is implemented, accepted because it cannot
change the answer (identifiers, tags), accepted only at its default value, handled by the
structured-output/tools code, or refused with a 400 that names it. No field is silently ignored.
"""

from __future__ import annotations

from llmkit.core.serve.fields import ApiError

# llama.cpp's request extensions, shared by the generating endpoints
LLAMA = {
    "top_k",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "ignore_eos",
    "speculative",
    "id_slot",
    "cache_prompt",
}
# structured output and tool calls: validated (or refused) by their own code, not here
DELEGATED = {"response_format", "grammar", "json_schema", "tools", "tool_choice"}
# no effect on the generated text by definition (end-user ids, tags, cache hints: our prefix cache
# is automatic); their type is still checked
INFO = {
    "user": str,
    "safety_identifier": str,
    "metadata": dict,
    "prompt_cache_key": str,
    "cache_control": dict,
}
# accepted only with one of these values (what this server does anyway)
DEFAULT_ONLY = {
    "store": (False,),
    "service_tier": ("auto", "default", "standard_only"),
    "modalities": (["text"],),
    "parallel_tool_calls": (True, False),  # only meaningful with tools (delegated)
    "thinking": ({"type": "disabled"},),
}

SAMPLING = {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias"}
COMMON = {"model", "stream", "stream_options", "max_tokens", "n", "stop", "logprobs"}

FIELDS = {
    "chat": COMMON
    | SAMPLING
    | LLAMA
    | {"messages", "max_completion_tokens", "top_logprobs"}
    | {"store", "service_tier", "modalities", "parallel_tool_calls"},
    "completions": COMMON | SAMPLING | LLAMA | {"prompt", "echo", "suffix", "best_of"},
    "messages": {"model", "messages", "system", "max_tokens", "stop_sequences", "stream"}
    | {"temperature", "top_p", "top_k", "service_tier", "thinking"}
    | (LLAMA - {"top_k"}),
    "count_tokens": {"model", "messages", "system", "thinking"},
    "embeddings": {"input", "model", "encoding_format", "dimensions"},
    "llama_completion": {"prompt", "n_predict", "stream", "stop", "seed", "n_probs"}
    | (SAMPLING - {"seed"})
    | LLAMA,
}


def check(body: dict, endpoint: str) -> None:
    """400 naming the first field this endpoint does not implement (see the module doc)."""
    known = FIELDS[endpoint]
    for key, v in body.items():
        if key in DELEGATED:
            continue
        if key in INFO:
            if v is not None and not isinstance(v, INFO[key]):
                kind = "a string" if INFO[key] is str else "an object"
                raise ApiError(400, f"'{key}' must be {kind}")
            continue
        if key not in known:
            raise ApiError(400, f"'{key}' is not supported by this server")
        if key in DEFAULT_ONLY and v is not None and v not in DEFAULT_ONLY[key]:
            allowed = " or ".join(repr(a) for a in DEFAULT_ONLY[key])
            raise ApiError(400, f"'{key}' is not supported by this server (only {allowed})")
