"""Where a model's kernels run: the device, the kernel family, the dtype of dense weight copies
(the "torch" family only), and the bytes of prepared weights the backend holds (what the memory
plan reports: native CPU kernels and the GPU's GEMV read the GGUF bytes, so it is 0 on a CPU).

Families: "cpu" (native kernels on the mmap'd GGUF blocks: kernels/cpu_native.py), "torch" (a
dense copy per weight and PyTorch matmuls: the float reference in tests, and the fallback where
the native library was not built), "triton" (GPU, or the Triton interpreter in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native

GEMV_MAX_ROWS = 16  # M <= this is the GEMV regime (decode, MTP verify); larger M is GEMM (prefill)
KERNEL_FAMILIES = ("cpu", "torch", "triton")


def default_family(device: torch.device | str) -> str:
    """The family a device runs by default: Triton on a GPU; native kernels on a CPU, or PyTorch
    where the native library is missing."""
    if torch.device(device).type == "cuda":
        return "triton"
    return "cpu" if cpu_native.available() else "torch"


@dataclass
class Backend:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weight_dtype: torch.dtype = torch.float32  # dense copies of the "torch" family
    kernels: str | None = None  # None: default_family(device)
    extra_bytes: int = 0  # bytes of prepared (dequantized / device) weights this backend holds
    linear_bytes: int = 0  # weight bytes its matmuls read per token (copies or the GGUF in place)
    repack: bool = True  # native kernels may read x8 groups (False: --no-repack, the GGUF rows)
    # (source view, x8 copy) of each weight the native kernels read from x8 groups
    # (kernels/cpu_pack.py): the copy holds the bytes in the source's place, same size
    packed: list = field(default_factory=list)

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.kernels is None:
            self.kernels = default_family(self.device)
        if self.kernels not in KERNEL_FAMILIES:
            raise LlmkitError(f"unknown kernel family {self.kernels!r} ({KERNEL_FAMILIES})")
        if self.kernels in ("cpu", "torch") and self.device.type != "cpu":
            raise LlmkitError(f"{self.kernels} kernels cannot run on device {self.device}")
        if self.kernels == "cpu" and not cpu_native.available():
            raise LlmkitError(f"native CPU kernels unavailable: {cpu_native.unavailable_reason()}")
