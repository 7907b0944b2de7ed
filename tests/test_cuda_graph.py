"""GraphDecoder (core/cuda_graph.py): decode steps in static-batch mode equal ordinary eager steps,
across bucket changes, a sliding-window ring that wraps, a rollback and a q8_0 cache.

Without a GPU the static steps run eagerly under the Triton interpreter (what a graph would
replay); with one they are captured and replayed as CUDA graphs."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402

pytest.importorskip("triton")

from llmkit.core.model import cuda_graph  # noqa: E402
from llmkit.core.model.cuda_graph import GraphDecoder  # noqa: E402
from llmkit.core.model.device import OnDevice  # noqa: E402
from llmkit.core.models.loader import load_model  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from tiny_models import write_tiny_gemma3, write_tiny_llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inner(lm):
    return lm.model.model if isinstance(lm.model, OnDevice) else lm.model  # the architecture's


@pytest.mark.parametrize("arch,kv", [("llama", "f16"), ("gemma3", "q8_0")])
def test_static_steps_equal_eager_steps(tmp_path, monkeypatch, arch, kv):
    monkeypatch.setattr(cuda_graph, "MIN_BUCKET", 4)  # buckets 4, 8, 16, 32 in 32 slots
    if arch == "llama":
        path = write_tiny_llama(tmp_path / "m.gguf", n_layer=2)
    else:
        path = write_tiny_gemma3(tmp_path / "m.gguf", window=4)  # ring of 4 + 8 slots wraps
    lm = load_model(path, device=DEVICE, kernels="triton")
    model = _inner(lm)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(3, 300, (30,), generator=g)
    with torch.inference_mode():
        ref = lm.new_cache(32, margin=8, type_k=kv, type_v=kv)
        st = lm.new_cache(32, margin=8, type_k=kv, type_v=kv)
        dec = GraphDecoder(model, st)
        assert dec.capture == (DEVICE == "cuda")
        dev = ref.device
        for c in (ref, st):  # prefill the same prompt eagerly
            model.forward(toks[:5].to(dev), c)

        def step(t):
            a = model.forward(toks[t : t + 1].to(dev), ref).logits.float().cpu()
            b = dec(toks[t : t + 1]).float().cpu()
            assert st.n_past == ref.n_past == t + 1
            assert ((a - b).norm() / a.norm()) < 1e-5, t

        for t in range(5, 22):
            step(t)
        for c in (ref, st):  # roll back 4 positions (inside the ring's margin), then go on
            c.truncate(18)
        for t in range(18, 30):
            step(t)
        if DEVICE == "cuda":
            assert len(dec.graphs) >= 3  # several buckets captured and replayed


def test_full_context_is_refused(tmp_path):
    lm = load_model(write_tiny_llama(tmp_path / "m.gguf"), device=DEVICE, kernels="triton")
    with torch.inference_mode():
        cache = lm.new_cache(8, margin=4)
        dec = GraphDecoder(_inner(lm), cache)
        _inner(lm).forward(torch.arange(3, 11).to(cache.device), cache)
        with pytest.raises(LlmkitError, match="context is full"):
            dec(torch.tensor([5]))


def test_static_batch_needs_the_triton_kernel(tmp_path):
    lm = load_model(write_tiny_llama(tmp_path / "m.gguf"))
    cache = lm.new_cache(8)
    assert cache.attn_kernel == "native"  # the CPU's kernel: it cannot be captured
    with pytest.raises(LlmkitError, match="triton attention"):
        with cache.static_batch(torch.zeros(1, dtype=torch.int64), 8):
            pass
