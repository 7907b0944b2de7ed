"""Shared fixtures: the two real models are fetched/assembled once into the user cache and reused by
every test module (CI keeps ~/.cache/llmkit between modules of one run)."""

import pytest


@pytest.fixture(scope="session")
def gemma_gguf():
    from llmkit.core.model_cache import ensure_gemma

    try:
        return ensure_gemma(quiet=True)
    except Exception as e:  # pragma: no cover - only when the package is absent
        pytest.skip(f"gemma3-270m unavailable: {e}")


@pytest.fixture(scope="session")
def smollm_gguf():
    from llmkit.core.model_cache import ensure_smollm

    try:
        return ensure_smollm(quiet=True)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"smollm2-135m unavailable: {e}")
