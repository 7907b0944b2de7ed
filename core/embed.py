"""Sentence embeddings from a decoder model, like llama.cpp's --embedding / /v1/embeddings.

Each input is evaluated alone in a fresh KV cache of its own length; the per-token embeddings are
the trunk's last hidden states after the output norm (llama.cpp's "result_norm"), pooled over the
input by `pooling` (llama.cpp's --pooling: mean, last token, or cls = the first token), then
L2-normalised (llama.cpp's /v1/embeddings normalises too).
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import ops

POOLINGS = ("mean", "last", "cls")


def _loaded(lm):
    """core/api.py's LLM holds the LoadedModel as `.lm`; a LoadedModel is taken as is."""
    return lm.lm if hasattr(lm, "lm") and hasattr(lm.lm, "model") else lm


def embed(
    lm,
    ids_list: list[list[int]],
    pooling: str = "mean",
    normalize: bool = True,
    n_ubatch: int = 512,
) -> list[list[float]]:
    """One embedding [n_embd] per token-id list."""
    if pooling not in POOLINGS:
        raise LlmkitError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    loaded = _loaded(lm)
    model = loaded.model
    n_vocab = model.config.n_vocab
    out = []
    with torch.inference_mode():
        for ids in ids_list:
            if not ids:
                raise LlmkitError("cannot embed an empty input")
            if not all(type(t) is int and 0 <= t < n_vocab for t in ids):
                raise LlmkitError(f"token ids must be integers between 0 and {n_vocab - 1}")
            out.append(_one(loaded, ids, pooling, normalize, n_ubatch))
    return out


def _one(loaded, ids: list[int], pooling: str, normalize: bool, n_ubatch: int) -> list[float]:
    model = loaded.model
    step = max(1, min(n_ubatch, len(ids)))
    cache = loaded.new_cache(len(ids), margin=step)
    t = torch.tensor(ids, dtype=torch.long)
    if pooling == "cls":
        t = t[:1]  # causal attention: the first token's state does not depend on the rest
    rows = []
    for s in range(0, t.numel(), step):
        h = model.forward(t[s : s + step], cache, logits=None).hidden
        rows.append(h[-1:] if pooling == "last" else h)
    rows = [torch.as_tensor(r) for r in rows]  # the torch-free runtime's are numpy arrays
    h = torch.cat(rows)[-1:] if pooling == "last" else torch.cat(rows)
    norm = torch.as_tensor(model.output_norm)
    h = ops.rms_norm(h.to(norm.device), norm, model.config.eps).float().cpu()
    v = h.mean(0) if pooling == "mean" else h[0]
    if normalize:
        v = v / v.norm().clamp_min(1e-12)
    return v.tolist()
