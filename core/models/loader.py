"""Open a GGUF file and build its architecture: one module per `general.architecture`.

lm = load_model("model.gguf")
cache = lm.new_cache(n_ctx=4096)
logits = lm.model.forward(torch.tensor(ids), cache).logits
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmkit.core.cache.kv import KVCache
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.model.config import ModelConfig, read_config
from llmkit.core.model.device import OnDevice, tensors_to
from llmkit.core.model.protocol import CausalLM
from llmkit.core.model.sidecar import BASE_ID_KEY, DRAFT_VOCAB_KEY, check_sidecar, shipped_head
from llmkit.core.model.specs import describe_file, vocab_overrides
from llmkit.core.model.weights import ignore_prefixes, load_tensors, weights_by_type
from llmkit.errors import LlmkitError
from llmkit.kernels.backend import Backend
from llmkit.kernels.ops import attention_kernel
from llmkit.quant.tensor import QTensor

# general.architecture -> module under llmkit.core.models (aliases map several names to one file)
ARCHITECTURES = {
    "llama": "llama",
    "gemma3": "gemma3",
    "gemma4": "gemma4",
    "gemma4-assistant": "gemma4_assistant",
    "step35": "step35",
}


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    arch: str
    config: ModelConfig
    model: CausalLM
    tensors: dict[str, QTensor]
    backend: Backend
    load_seconds: float

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    def new_cache(
        self, n_ctx: int, margin: int = 512, type_k: str = "f16", type_v: str = "f16"
    ) -> KVCache:
        return KVCache(
            self.model.kv_layout(),
            n_ctx,
            margin,
            type_k,
            type_v,
            self.backend.device,
            attention_kernel(self.backend.kernels),
        )

    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def n_params(self) -> int:
        return sum(int(torch.Size(t.shape).numel()) for t in self.tensors.values())

    def describe(self) -> str:
        """llama.cpp-style "<arch> <size label> <file type>" line."""
        return describe_file(self.arch, self.metadata)

    def memory_plan(self, cache: KVCache | None = None) -> dict:
        plan = {
            "weights_bytes": self.weights_bytes(),
            "weights_by_type": weights_by_type(self.tensors),
            "backend_extra_bytes": self.backend.extra_bytes,
            "backend_weight_dtype": str(self.backend.weight_dtype).removeprefix("torch."),
        }
        if cache is not None:
            plan["kv"] = {"main": cache.plan()}
        return plan


def arch_module(arch: str):
    name = ARCHITECTURES.get(arch)
    if name is None:
        raise LlmkitError(
            f"unknown architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return importlib.import_module(f"llmkit.core.models.{name}")


def _load_weights(mod, cfg, gf: GGUFFile, gd: GGUFFile | None, mtp: bool) -> dict[str, QTensor]:
    """Trunk tensors from the model file; with `mtp`, the NextN blocks from the sidecar (if given)
    or from the model file. Without `mtp` no NextN tensor is mapped (nothing of them is read)."""
    tensors = load_tensors(
        gf,
        mod.tensor_specs(cfg, "trunk", gf.tensors),
        ignore_prefixes=ignore_prefixes(cfg, "trunk"),
    )
    if mtp:
        src = gd or gf
        specs = [s for s in mod.tensor_specs(cfg, "mtp", src.tensors) if s.name.startswith("blk.")]
        # the sidecar repeats the embedding/head; the model file's copies are the ones used
        shared = ("token_embd.", "output.", "output_norm.", "rope_freqs.")
        tensors.update(
            load_tensors(src, specs, ignore_prefixes=ignore_prefixes(cfg, "mtp") + shared)
        )
    return tensors


def _shipped_head(gf: GGUFFile) -> GGUFFile | None:
    p = shipped_head(gf)
    return GGUFFile(p) if p is not None else None


@dataclass
class ModelFile:
    """A model file read and checked: metadata types and ranges, the typed config, every tensor
    the architecture needs (mapped, not read), the vocabulary against the embedding."""

    gf: GGUFFile
    gd: GGUFFile | None  # the MTP sidecar, when one is used
    arch: str
    module: object  # the architecture's module (core/models/<arch>.py)
    config: ModelConfig
    tensors: dict[str, QTensor]


def read_model_file(
    path: str | Path,
    mtp: bool = False,
    draft_path: str | Path | None = None,
    moe_n_expert: int | None = None,
) -> ModelFile:
    """Everything `load_model` checks before it builds anything (`llm tokenize` runs it too, so a
    file `llm run` rejects is rejected there as well)."""
    gf = GGUFFile(path)
    arch = gf.architecture
    mod = arch_module(arch)
    overrides = vocab_overrides(gf)
    emb = gf.tensors["token_embd.weight"]
    gd = GGUFFile(draft_path) if draft_path else None
    if mtp and gd is None and not gf.metadata.get(f"{arch}.nextn_predict_layers"):
        gd = _shipped_head(gf)  # a head trained by `llm mtp-train` and shipped for this model
    if gd is not None and BASE_ID_KEY in gd.metadata:
        check_sidecar(gf, gd)  # no embedding copy: the recorded base identity must match
    elif gd is not None:
        d_emb = gd.tensors.get("token_embd.weight")
        if gd.architecture != arch or d_emb is None or d_emb.shape != emb.shape:
            got = f"{gd.architecture} {list(d_emb.shape) if d_emb else '?'}"
            raise LlmkitError(
                f"MTP sidecar {draft_path} does not belong to this model "
                f"(sidecar: {got}, model: {arch} {list(emb.shape)})"
            )
    if moe_n_expert is not None:
        if "n_expert_used_override" not in {f.name for f in dataclasses.fields(mod.Config)}:
            raise LlmkitError(f"--moe-n-expert: architecture {arch} has no experts")
        overrides["n_expert_used_override"] = moe_n_expert
    # the sidecar declares the NextN blocks (block_count, per-layer arrays) for both files
    cfg = read_config(mod.Config, (gd or gf).metadata, arch, **overrides)
    if mtp and cfg.n_nextn == 0:
        raise LlmkitError(
            f"--mtp: {path} has no NextN (MTP) blocks (nextn_predict_layers is 0); "
            "give an MTP sidecar with -md (`llm mtp-train` makes one)"
        )
    tensors = _load_weights(mod, cfg, gf, gd, mtp)
    return ModelFile(gf, gd, arch, mod, cfg, tensors)


def apply_draft_vocab(model, gf: GGUFFile) -> None:
    """The MTP heads' draft vocabulary from the head file's metadata (DRAFT_VOCAB_KEY), if any."""
    vocab = gf.metadata.get(DRAFT_VOCAB_KEY)
    if vocab is None:
        return
    if not (isinstance(vocab, np.ndarray) and vocab.dtype.kind in "iu" and vocab.ndim == 1):
        raise LlmkitError(f"GGUF metadata {DRAFT_VOCAB_KEY} must be an array of integers")
    model.mtp.set_draft_vocab(torch.as_tensor(vocab.astype(np.int64)))


def load_model(
    path: str | Path,
    device: str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
    mtp: bool = False,
    draft_path: str | Path | None = None,
    moe_n_expert: int | None = None,
    kernels: str | None = None,
    repack: bool = True,
    model_file: ModelFile | None = None,
) -> LoadedModel:
    """Load a GGUF model. `mtp` also loads the NextN (MTP) blocks, from `draft_path` (an MTP-only
    sidecar) when given; `moe_n_expert` overrides the routed experts per token of MoE models;
    `kernels` picks the matmul family ("cpu" or "triton"; default by device, kernels/ops.py);
    `repack` False keeps the native kernels on the GGUF rows (llama.cpp's --no-repack);
    `model_file`: `path` already read (read_model_file with the same arguments)."""
    t0 = time.perf_counter()
    mf = model_file or read_model_file(path, mtp, draft_path, moe_n_expert)
    gf, gd, arch, mod, cfg, tensors = mf.gf, mf.gd, mf.arch, mf.module, mf.config, mf.tensors
    if device not in ("cpu", "cuda"):
        raise LlmkitError(f"unknown device {device!r} (use cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise LlmkitError("--device cuda requested but no CUDA device is available")
    backend = Backend(torch.device(device), weight_dtype, kernels, repack=repack)
    if backend.device.type != "cpu":
        tensors = tensors_to(tensors, backend.device)
    model = mod.Model(cfg, tensors, backend, mtp=mtp)
    if mtp:
        apply_draft_vocab(model, gd or gf)
    if backend.device.type != "cpu":
        model = OnDevice(model, backend.device)
    return LoadedModel(Path(path), gf, arch, cfg, model, tensors, backend, time.perf_counter() - t0)
