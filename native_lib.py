"""Where the package's native library lives, and loading it: a leaf both kernels/ (matmul,
attention, row ops) and quant/ (the quantizer searches) use, so neither imports the other.

The library is `kernels/_llk*.so`, built by setup.py during `pip install` (plain C behind a
small C ABI, loaded with ctypes; the same file loaded twice is one library, one thread pool).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path


def library_path() -> Path | None:
    here = Path(__file__).resolve().parent / "kernels"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_llk{suffix}"
        if p.exists():
            return p
    return None


@functools.cache
def load_library() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why it is unavailable)."""
    path = library_path()
    if path is None:
        return None, "the native library _llk was not built (reinstall: pip install -e .)"
    try:
        return ctypes.CDLL(str(path)), ""
    except OSError as e:
        return None, f"cannot load {path.name}: {e}"
