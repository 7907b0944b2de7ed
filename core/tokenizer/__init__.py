"""Tokenizers for GGUF vocabularies, token-for-token identical to llama.cpp.

`load_tokenizer(metadata)` builds a `Tokenizer` from GGUF metadata: SPM vocabularies
(`tokenizer.ggml.model = llama`, e.g. Gemma) on llama.cpp's merge loop (native, spm.py), BPE
vocabularies (`gpt2`, e.g. SmolLM2, Llama 3, Qwen) on our llama.cpp pre-tokenizer regexes plus HF
`tokenizers`.
"""

from .tokenizer import Tokenizer, load_tokenizer
from .vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    UNDEFINED,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocab,
    load_vocab,
)

__all__ = [
    "BYTE",
    "CONTROL",
    "NORMAL",
    "UNDEFINED",
    "UNKNOWN",
    "UNUSED",
    "USER_DEFINED",
    "Tokenizer",
    "Vocab",
    "load_tokenizer",
    "load_vocab",
]
