"""Loading a model for the torch-free runtime, and when `LLM.load` takes it.

The runtime serves plain decoding (any sampler settings, grammars, logprobs) on a CPU with the
native library, for the architectures with a native block plan (core/archs.NATIVE) whose every
tensor type the native kernels read, with f16 / f32 / bf16 / q8_0 / q4_0 KV. Anything else
(a GPU, --mtp and the other drafters, tensor or layer splits, early exit, TurboQuant KV, a type
only the torch path dequantizes) loads the torch model (core/models/loader.py). Without torch
loaded, a run's peak memory is the weights, the KV and ~50 MiB of Python; torch alone adds ~220.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from llmkit.core.archs import NATIVE, arch_spec
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.lean.kv import KV_TYPES, LeanKV
from llmkit.core.lean.model import LeanModel
from llmkit.core.model.config import ModelConfig, read_config
from llmkit.core.model.specs import check_tensors, describe_file, vocab_overrides, weights_by_type
from llmkit.kernels import native_abi


def lean_options(opts) -> bool:
    """Whether the load options (core/api.LoadOptions) leave nothing the torch-free runtime
    lacks; the file decides the rest (`lean_file`)."""
    return (
        native_abi.available()
        and (opts.device in (None, "cpu"))
        and not (opts.n_gpu_layers and gpu_driver_present())
        and not opts.mtp
        and opts.spec is None
        and opts.model_draft is None
        and opts.tp is None
        and not opts.layer_split
        and not opts.n_layer_exit
        and opts.moe_n_expert is None
        and opts.type_k in KV_TYPES
        and opts.type_v in KV_TYPES
    )


def gpu_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded: only then may -ngl mean a GPU (the torch path decides
    whether it is usable); without one -ngl runs on the CPU, with llama.cpp's note."""
    return Path("/proc/driver/nvidia/version").exists()


def lean_file(gf: GGUFFile):
    """(config, checked tensor infos) when the runtime can run the file, else None."""
    arch = gf.architecture
    if arch not in NATIVE:
        return None
    spec = arch_spec(arch)
    cfg = read_config(spec.Config, gf.metadata, arch, **vocab_overrides(gf))
    if cfg.softcap > 0 or cfg.n_nextn:  # (NextN blocks: their drafting runs on torch)
        return None
    if any(t.qtype not in native_abi.SUPPORTED_TYPES for t in gf.tensors.values()):
        return None  # a type only the torch path dequantizes
    return cfg, check_tensors(gf, spec.tensor_specs(cfg), native_abi.SUPPORTED_TYPES)


@dataclass
class LeanLoaded:
    """A model loaded for the torch-free runtime: what LLM, the reports and `llm run` read of a
    loaded model (core/models/loader.LoadedModel's surface)."""

    path: Path
    gguf: GGUFFile
    arch: str
    config: ModelConfig
    model: LeanModel
    tensors: dict
    load_seconds: float
    backend: SimpleNamespace = field(default_factory=SimpleNamespace)

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    def new_cache(self, n_ctx: int, margin: int = 512, type_k: str = "f16",
                  type_v: str = "f16") -> LeanKV:  # fmt: skip
        return self.model.new_cache(n_ctx, margin, type_k, type_v)

    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def describe(self) -> str:
        return describe_file(self.arch, self.metadata)

    def memory_plan(self, cache=None) -> dict:
        plan = {
            "weights_bytes": self.weights_bytes(),
            "weights_by_type": weights_by_type(self.tensors),
            "backend_extra_bytes": 0,
            "backend_weight_dtype": "gguf blocks (native, torch-free)",
        }
        if cache is not None:
            plan["kv"] = {"main": cache.plan()}
        return plan


def load_lean(gf: GGUFFile, cfg, infos: dict, max_rows: int, repack: bool, t0: float):
    """The LeanLoaded of a file `lean_file` accepted (`t0`: when the load began)."""
    model = LeanModel(gf, gf.architecture, cfg, max_rows, repack)
    backend = SimpleNamespace(device=SimpleNamespace(type="cpu"), kernels="cpu",
                              packed=model.packed, repack=repack,
                              linear_bytes=model.linear_bytes)  # fmt: skip
    return LeanLoaded(gf.path, gf, gf.architecture, cfg, model, infos,
                      time.perf_counter() - t0, backend)  # fmt: skip


def load_if_lean(path, max_rows: int, repack: bool = True) -> LeanLoaded | None:
    """The file loaded for the torch-free runtime when it can run it (the native library
    available, `lean_file`), else None."""
    if not native_abi.available():
        return None
    t0 = time.perf_counter()
    gf = GGUFFile(path)
    got = lean_file(gf)
    return load_lean(gf, *got, max_rows, repack, t0) if got is not None else None
