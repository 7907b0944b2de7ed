"""Serve a model over HTTP: OpenAI- and Anthropic-compatible (like llama-server)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmkit.cli.common import LOAD


def serve(
    model: str = typer.Option(
        None, "-m", "--model", help="GGUF file or known model name (default: gemma3-270m)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback default)."),
    port: int = typer.Option(8080, "--port", help="Port (0: any free port)."),
    parallel: int = typer.Option(1, "-np", "--parallel", help="Slots (requests decoded at once)."),
    ctx_size: int = typer.Option(
        4096, "-c", "--ctx-size", help="Tokens per request: prompt + generation (0: training)."
    ),
    batch_size: int = typer.Option(
        512, "-ub", "--ubatch-size", help="Prompt tokens per prefill chunk."
    ),
    kv_cache_tokens: int = typer.Option(
        0, "--kv-cache-tokens", help="KV pool size in tokens (0: ctx-size x parallel)."
    ),
    kv_block_size: int = typer.Option(16, "--kv-block-size", help="Tokens per KV block."),
    no_prefix_sharing: bool = typer.Option(
        False, "--no-prefix-sharing", help="Do not reuse cached prompt-prefix blocks."
    ),
    metrics: bool = typer.Option(False, "--metrics", help="Enable the /metrics endpoint."),
    pooling: str = typer.Option(
        "mean", "--pooling", help="/v1/embeddings pooling: mean, last or cls (first token)."
    ),
    api_key: str = typer.Option(
        None, "--api-key", help="Require this key (Bearer or x-api-key) on all but /health."
    ),
    max_body: int = typer.Option(
        1 << 20, "--max-body-bytes", help="Largest request body accepted."
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", help="Requests that may wait for a slot; more get 503 + Retry-After."
    ),
    timeout: float = typer.Option(
        60.0,
        "-to",
        "--timeout",
        help="Seconds to receive a request body (else 408) and to send each streamed chunk.",
    ),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: all cores)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cpu, or -ngl's)."),
    n_gpu_layers: str = LOAD["n_gpu_layers"],
    flash_attn: str = LOAD["flash_attn"],
    no_mmap: bool = LOAD["no_mmap"],
    mlock: bool = LOAD["mlock"],
    no_repack: bool = LOAD["no_repack"],
    chat_template: str = LOAD["chat_template"],
    chat_template_file: Path = LOAD["chat_template_file"],
    jinja: bool = LOAD["jinja"],
    cache_type_k: str = typer.Option("f16", "-ctk", "--cache-type-k", help="K cache type."),
    cache_type_v: str = typer.Option("f16", "-ctv", "--cache-type-v", help="V cache type."),
    mtp: bool = typer.Option(False, "--mtp", help="MTP speculative decoding (NextN blocks)."),
    model_draft: str = typer.Option(
        None,
        "-md",
        "--model-draft",
        help="MTP-only sidecar GGUF, or a gemma4-assistant drafter (with --mtp).",
    ),
    draft: int = typer.Option(3, "--draft", help="Max draft tokens per round."),
    draft_p_min: float = typer.Option(0.0, "--draft-p-min", help="Stop drafting below this p."),
    draft_policy: str = typer.Option(
        "adaptive", "--draft-policy", help="adaptive (shrink drafts under load) or fixed."
    ),
    cache_type_k_draft: str = typer.Option(
        "f16", "-ctkd", "--cache-type-k-draft", help="K cache type of the MTP contexts."
    ),
    cache_type_v_draft: str = typer.Option(
        "f16", "-ctvd", "--cache-type-v-draft", help="V cache type of the MTP contexts."
    ),
    tp: int = typer.Option(
        1, "--tp", help="Tensor-parallel ranks: rank 0 serves and drives the others."
    ),
    tp_mode: str = typer.Option(
        "exact", "--tp-mode", help="exact (gathers, tp=1's bits) or sum (Megatron partial sums)."
    ),
) -> None:
    """Serve a GGUF model: /v1/chat/completions, /v1/completions, /v1/messages, /v1/embeddings,
    /v1/models, /completion, /tokenize, /props, /health, /slots, /metrics, a chat page at /;
    parallel slots with continuous batching and a paged KV cache."""
    from llmkit.errors import LlmkitError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LlmkitError(
            "llm serve needs the server extras: pip install 'llmkit[serve]'"
        ) from None
    if metrics:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise LlmkitError(
                "--metrics needs prometheus-client: pip install 'llmkit[serve]'"
            ) from None
    from llmkit.cli.common import (
        chat_template_option,
        check_flash_attn,
        eprint,
        gpu_device,
        set_threads,
    )  # fmt: skip
    from llmkit.core.api import pin_weights
    from llmkit.core.decode.assistant import is_assistant_file
    from llmkit.core.model.catalog import resolve_model
    from llmkit.core.models.loader import load_model, read_model_file
    from llmkit.core.serve.engine import ServeOptions
    from llmkit.core.serve.server import HttpOptions, Server
    from llmkit.core.tokenizer import load_tokenizer

    for flag, v, lo in (("-np", parallel, 1), ("-ub", batch_size, 1), ("-c", ctx_size, 0)):
        if v < lo:
            raise LlmkitError(f"{flag} must be >= {lo}, got {v}")
    if not 0 <= port <= 65535:
        raise LlmkitError(f"--port must be between 0 and 65535, got {port}")
    if kv_cache_tokens < 0 or max_body < 1:
        raise LlmkitError("--kv-cache-tokens must be >= 0 and --max-body-bytes >= 1")
    if pooling not in ("mean", "last", "cls"):
        raise LlmkitError(f"--pooling must be mean, last or cls, not {pooling!r}")
    if max_queue < 1:
        raise LlmkitError(f"--max-queue must be >= 1, got {max_queue}")
    if not 0 < timeout < float("inf"):  # also refuses nan
        raise LlmkitError(f"--timeout must be a finite number > 0, got {timeout}")
    if not 0.0 <= draft_p_min <= 1.0:
        raise LlmkitError(f"--draft-p-min must be in [0, 1], got {draft_p_min}")
    if model_draft and not mtp:
        raise LlmkitError("-md/--model-draft is the MTP sidecar: it needs --mtp")
    check_flash_attn(flash_attn)
    if tp > 1 and mtp:
        raise LlmkitError("--tp: llm serve does not draft (--mtp) under tensor parallelism")
    chat_template = chat_template_option(chat_template, chat_template_file)
    set_threads(threads)
    from llmkit.core.distributed.launch import begin_run, finish

    dev = gpu_device(device, n_gpu_layers)
    group = begin_run(tp, tp_mode, threads, dev, model, None, False, None)
    path = resolve_model(model)
    draft_path = resolve_model(model_draft) if model_draft else None
    # a Gemma 4 assistant drafts from its own file; a NextN sidecar loads with the model
    assistant = draft_path is not None and is_assistant_file(draft_path)
    tokenizer = None  # read before the weights where this process loads them whole
    if group is not None:
        from llmkit.core.distributed.load import load_shard

        lm = group.agree(
            lambda: load_shard(group, path, device=dev or "cpu", mode=tp_mode, repack=not no_repack)
        )
    else:  # the tokenizer first, as LLM.load does: its build's transient stays below the weights
        mf = read_model_file(path, mtp and not assistant, None if assistant else draft_path)
        tokenizer = load_tokenizer(mf.gf.metadata)
        lm = load_model(
            path,
            device=dev,
            mtp=mtp and not assistant,
            draft_path=None if assistant else draft_path,
            repack=not no_repack,
            model_file=mf,
        )
    for w in pin_weights(lm, not no_mmap, mlock):
        eprint(f"warning: {w}")
    n_ctx = ctx_size or lm.config.n_ctx_train
    opts = ServeOptions(
        n_slots=parallel,
        n_ctx=n_ctx,
        n_ubatch=batch_size,
        kv_tokens=kv_cache_tokens or None,
        kv_block_size=kv_block_size,
        type_k=cache_type_k,
        type_v=cache_type_v,
        type_k_draft=cache_type_k_draft,
        type_v_draft=cache_type_v_draft,
        mtp=mtp,
        assistant=str(draft_path) if assistant else None,
        draft=draft,
        draft_p_min=draft_p_min,
        draft_policy=draft_policy,
        prefix_sharing=not no_prefix_sharing,
        max_queue=max_queue,
    )
    http = HttpOptions(
        host, port, api_key, metrics, max_body, timeout_s=timeout, pooling=pooling,
        chat_template=chat_template,
    )  # fmt: skip
    if group is not None and group.rank > 0:  # a follower: rank 0's engine drives this one
        from llmkit.core.serve.engine import Engine
        from llmkit.core.serve.tp import follow

        follow(group, Engine(lm, load_tokenizer(lm.metadata), opts))
        return finish(group)
    server = Server(lm, tokenizer or load_tokenizer(lm.metadata), opts, http, path.stem)
    lead = None
    if group is not None:
        from llmkit.core.serve.tp import Leader

        lead = Leader(group)
        lead.attach(server.engine)
    kv = server.engine.pool.stats()
    eprint(
        f"model: {path} ({lm.describe()}); {parallel} slots x {n_ctx} tokens; KV pool "
        f"{kv['bytes'] / 2**20:.2f} MiB in blocks of {kv_block_size} tokens"
    )
    if mtp:
        plan = server.engine.mtp_plan
        what = (
            f"assistant reading target layers {plan['reads']}, a one-sequence workspace of "
            f"{plan['workspace']['bytes'] / 2**20:.2f} MiB"
            if assistant
            else f"{plan['bytes'] / 2**20:.2f} MiB"
        )
        eprint(
            f"mtp: {plan['slots']} slot contexts reserved at start-up, {what}, "
            f"draft {draft} ({draft_policy})"
        )
    try:
        server.serve_forever()
    finally:
        if lead is not None:
            lead.stop()
            finish(group)
