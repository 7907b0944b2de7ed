"""llmkit: run GGUF models like llama.cpp, from Python.

The repository root is this package; subpackages: ``llmkit.core`` (loader, models, KV cache,
generation), ``llmkit.quant`` (ggml block formats), ``llmkit.kernels`` (matmul/attention
dispatch), ``llmkit.cli`` (the ``llm`` command).
"""

__version__ = "0.1.0"
