"""Shared fixtures: the two real models are fetched/assembled once into the user cache
(~/.cache/llmkit, or $LLMKIT_CACHE) and reused by every test module and every later run.
Outside CI a missing model skips its tests; in CI (CI=true) it fails them."""

import os

import pytest


def _real_model(ensure):
    try:
        return ensure(quiet=True)
    except Exception as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real model unavailable: {e}")


@pytest.fixture(scope="session")
def gemma_gguf():
    from llmkit.core.model.catalog import ensure_gemma

    return _real_model(ensure_gemma)


@pytest.fixture(scope="session")
def smollm_gguf():
    from llmkit.core.model.catalog import ensure_smollm

    return _real_model(ensure_smollm)
