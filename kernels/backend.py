"""Where a model's kernels run: the device, the dtype of dense weight copies, the kernel family,
and the bytes of prepared weights the backend holds (what the memory plan reports)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit.errors import LlmkitError

GEMV_MAX_ROWS = 16  # M <= this is the GEMV regime (decode, MTP verify); larger M is GEMM (prefill)
KERNEL_FAMILIES = ("cpu", "triton")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """avx512_bf16 / amx_bf16 (x86) or bf16 (arm64) in /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


@dataclass
class Backend:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weight_dtype: torch.dtype = torch.bfloat16
    kernels: str | None = None  # "cpu" | "triton"; None = by device (cuda -> triton)
    extra_bytes: int = 0  # bytes of prepared (packed/dequantized/device) weights this backend holds

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.kernels is None:
            self.kernels = "triton" if self.device.type == "cuda" else "cpu"  # ops.kernel_family
        if self.kernels not in KERNEL_FAMILIES:
            raise LlmkitError(f"unknown kernel family {self.kernels!r} ({KERNEL_FAMILIES})")
        if self.kernels == "cpu" and self.device.type != "cpu":
            raise LlmkitError(f"cpu kernels cannot run on device {self.device}")
