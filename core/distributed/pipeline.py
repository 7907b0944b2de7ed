"""`--split-mode layer --tensor-split a,b,...`: consecutive layers on several devices of one
machine (llama.cpp's layer split). Device i gets a share a_i / sum(a) of the trunk layers, in
order; each layer's KV cache lives on its device (one KVCache per device over its layers); the
hidden rows are handed to the next device at each boundary; the embedding is on the first
device, the output norm, the LM head and the MTP heads (with their draft KV) on the last.

The weights are mapped on the CPU first (no copies: the native kernels read the mmap) and each
block is then rebuilt on its device's Backend from its own tensors (moved there), so a GPU only
ever receives its own layers. On a CPU machine the devices are all "cpu": the same rebuild and
hand-over code runs (what the tests check), with nothing to copy.
"""

from __future__ import annotations

import contextlib

import torch

from llmkit.core.cache.kv import KVCache
from llmkit.core.model.device import tensors_to
from llmkit.core.model.protocol import ForwardOutput, Rows
from llmkit.core.models.common import lm_head, rope_rows, select_rows, token_ids
from llmkit.errors import LlmkitError
from llmkit.kernels.backend import Backend
from llmkit.kernels.ops import attention_kernel


def assign_layers(n_layer: int, shares) -> list[int]:
    """Device index of each layer: consecutive runs sized by the shares (llama.cpp's rule)."""
    total, out, acc = sum(shares), [], 0.0
    bounds = []
    for s in shares:
        acc += s
        bounds.append(round(n_layer * acc / total))
    for il in range(n_layer):
        out.append(next(i for i, b in enumerate(bounds) if il < b))
    return out


class SplitCache:
    """One KVCache per device over its layers, spoken to as one cache."""

    def __init__(self, layout: dict, device_of: dict[int, int], devices, n_ctx: int,
                 margin: int, type_k: str, type_v: str, kernels: list[str]):  # fmt: skip
        self.caches = []
        self.cache_of: dict[int, KVCache] = {}
        for d, dev in enumerate(devices):
            mine = {il: kv for il, kv in layout.items() if device_of[il] == d}
            if not mine:
                continue
            c = KVCache(mine, n_ctx, margin, type_k, type_v, torch.device(dev),
                        attention_kernel(kernels[d]))  # fmt: skip
            self.caches.append(c)
            self.cache_of.update(dict.fromkeys(mine, c))

    def __getattr__(self, name):  # n_past, n_ctx, margin, attn_kernel, type_k ...: the first's
        return getattr(self.caches[0], name)

    def positions(self, T: int) -> torch.Tensor:
        return self.caches[0].positions(T)

    def begin(self, pos: torch.Tensor) -> None:
        for c in self.caches:
            c.begin(pos.to(c.device))

    def attend(self, il: int, q, k, v, scale: float) -> torch.Tensor:
        return self.cache_of[il].attend(il, q, k, v, scale)

    def native_step(self, il: int) -> tuple | None:
        return self.cache_of[il].native_step(il)

    def native_stack(self, layers: tuple[int, ...]) -> None:
        return None  # the layers live on several devices: one call per block

    @contextlib.contextmanager
    def tree_batch(self, parents: list[int]):
        with contextlib.ExitStack() as st:
            for c in self.caches:
                st.enter_context(c.tree_batch(parents))
            yield

    def commit_path(self, p0: int, path: list[int]) -> None:
        for c in self.caches:
            c.commit_path(p0, path)

    def truncate(self, p: int) -> None:
        for c in self.caches:
            c.truncate(p)

    def clear(self) -> None:
        for c in self.caches:
            c.clear()

    @property
    def layers(self) -> list[int]:
        return sorted(self.cache_of)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def plan(self) -> dict:
        p = self.caches[0].plan()
        per = [
            {"device": str(c.device), "layers": c.layers, "bytes": c.nbytes()} for c in self.caches
        ]
        return {**p, "layers": self.layers, "bytes": self.nbytes(), "devices": per}


class LayerSplitModel:
    """The model over several devices: CPU tokens in, CPU logits out, the hidden state handed
    over at each device boundary (`handovers` counts them)."""

    supports_cuda_graphs = False

    def __init__(self, model, devices, device_of: list[int]):
        self.model, self.devices, self.device_of = (
            model,
            [torch.device(d) for d in devices],
            device_of,
        )
        self.config, self.mtp, self.blocks = model.config, model.mtp, model.blocks
        self.handovers = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def kv_layout(self) -> dict:
        return self.model.kv_layout()

    def forward(self, tokens: torch.Tensor, cache, logits: Rows = "last",
                n_layer: int | None = None) -> ForwardOutput:  # fmt: skip
        tokens = token_ids(tokens)
        pos = cache.positions(tokens.numel())
        cache.begin(pos)
        memo: dict = {}
        first = self.devices[0]
        x = self.model.embed(tokens.to(first)).to(first)
        d = 0
        for il, blk in enumerate(self.blocks[:n_layer]):
            if self.device_of[il] != d:  # the boundary: the rows go to the next device
                d = self.device_of[il]
                x = x.to(self.devices[d])
                self.handovers += 1
            m = memo.setdefault(d, {})
            x = blk(x, rope_rows(blk.rope, pos.to(self.devices[d]), m), cache)
        out = None if logits is None else self.lm_logits(select_rows(x, logits))
        return ForwardOutput(out, x.cpu())

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_logits(x.to(self.devices[-1])).cpu()


def split_layers(lm, devices, shares) -> LayerSplitModel:
    """Rebuild `lm`'s blocks on their devices (the embedding on the first, the head and the MTP
    heads on the last) and wrap the model; `lm.model` becomes the wrapper."""
    model, c = lm.model, lm.config
    if not hasattr(model, "load_block") or not hasattr(model, "blocks"):
        raise LlmkitError(f"--split-mode layer: {lm.arch} models cannot be split by layers")
    device_of = assign_layers(c.n_layer, shares)
    backends = [Backend(torch.device(d)) for d in devices]
    full = model.tensors
    for il in range(c.n_layer):
        model.backend = backends[device_of[il]]
        b = f"blk.{il}."
        model.tensors = _on(full, lambda n, b=b: n.startswith(b), model.backend)
        model.blocks[il] = model.load_block(il)
    last = backends[-1]
    model.backend, model.tensors = last, _on(full, lambda n: not n.startswith("blk.") or
                                             int(n.split(".")[1]) >= c.n_layer, last)  # fmt: skip
    model.output_norm = model.output_norm.to(last.device)
    model.output = lm_head(last, model.tensors)
    if model.mtp is not None:
        from llmkit.core.models.nextn import NextNHeads

        model.mtp = NextNHeads(model)
    model.tensors = full
    if backends[0].device.type != "cpu":
        emb = tensors_to({"token_embd.weight": full["token_embd.weight"]}, backends[0].device)
        model.embed = type(model.embed)(emb["token_embd.weight"], model.embed.scale)
    lm.backend = last  # what the MTP drafter's KV is allocated on
    return LayerSplitModel(model, devices, device_of)


def _on(tensors: dict, keep, backend: Backend) -> dict:
    """The tensors `keep(name)` selects, on the backend's device (the others as they are)."""
    sel = {n: t for n, t in tensors.items() if keep(n)}
    if backend.device.type != "cpu":
        sel = tensors_to(sel, backend.device)
    return {**tensors, **sel}


def split_cache(split: LayerSplitModel, n_ctx: int, margin: int, type_k: str, type_v: str):
    kernels = [Backend(d).kernels for d in split.devices]
    by_layer = dict(enumerate(split.device_of))
    return SplitCache(split.kv_layout(), by_layer, split.devices, n_ctx, margin, type_k, type_v,
                      kernels)  # fmt: skip
