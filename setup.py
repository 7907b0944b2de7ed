"""Builds llmkit's native CPU kernels (kernels/native/*.c) into llmkit/kernels/_llk*.so.

Everything else about the package lives in pyproject.toml. The extension is a plain C shared
library loaded with ctypes (kernels/cpu_native.py): it uses no CPython or torch headers. It is
compiled for the baseline of the target architecture (no -march): the AVX2, AVX-512 and NEON
dotprod kernels carry their own target attributes and are chosen at run time from the CPU.
"""

from pathlib import Path

from setuptools import Extension, setup

NATIVE = Path("kernels/native")
SOURCES = [
    "threadpool.c", "quantize_act.c", "matmul.c", "probe.c", "linear.c", "rowops.c", "attention.c", "block.c",
    "dot_scalar.c", "dot_avx2.c", "dot_avx512.c", "dot_neon.c", "quantize_k.c",
    "quantize_legacy.c", "spm.c", "stlmap.c", "pack.c",
]  # fmt: skip

llk = Extension(
    "llmkit.kernels._llk",
    sources=[str(NATIVE / s) for s in SOURCES],
    include_dirs=[str(NATIVE)],
    depends=[str(p) for p in sorted(NATIVE.glob("*.h")) + sorted(NATIVE.glob("*.inc"))],
    # -ffp-contract=off: no implicit fused multiply-add, so each path's fp32 operation sequence is
    # exactly the one written (batch invariance, and scalar == reference order). -g0 overrides
    # Python's -g: debug info would make the library 10x larger.
    extra_compile_args=[
        "-O3",
        "-std=c11",
        "-fPIC",
        "-pthread",
        "-ffp-contract=off",
        "-fvisibility=hidden",
        "-g0",
    ],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[llk])
