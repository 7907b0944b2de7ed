"""llmkit: run GGUF models like llama.cpp, from Python.

    import llmkit
    lm = llmkit.load("smollm2-135m")          # a GGUF path or a known model name
    print(lm.generate("The capital of France is", n_predict=16, temp=0))
    out = lm.create_completion("Hello", max_tokens=8)   # llama-cpp-python-like, OpenAI-shaped

Subpackages: ``llmkit.core`` (GGUF reader, model contract and architectures, KV caches, the decode
loop and drafters, tokenizers, and the apps: serve, bench, convert, mtp_train, perplexity),
``llmkit.kernels`` (the kernel table and its CPU / Triton kernels), ``llmkit.quant`` (ggml block
formats), ``llmkit.cli`` (the ``llm`` command).
"""

__version__ = "0.1.0"
__all__ = ["LLM", "load", "__version__"]


def load(model=None, **options):
    """Load a model for generation: see `llmkit.core.api.LLM.load`."""
    from llmkit.core.api import LLM  # torch and the model code load on first use, not on import

    return LLM.load(model, **options)


def __getattr__(name):
    if name == "LLM":
        from llmkit.core.api import LLM

        return LLM
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
