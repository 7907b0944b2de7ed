"""The torch-free CPU runtime (core/lean/): the same logits, bit for bit, as the torch path's
native CPU kernels, prompt chunks and decode steps alike (sliding rings wrapping included); the
same tokens from the same seed; `llm run` never importing torch; forced where it cannot run, a
one-line error."""

import subprocess
import sys

import numpy as np
import pytest

from llmkit.core.api import LLM
from llmkit.core.decode.loop import no_grad
from llmkit.core.decode.sampling import host
from llmkit.core.lean.kv import LeanKV
from llmkit.core.lean.load import LeanLoaded
from llmkit.errors import LlmkitError
from llmkit.kernels import native_abi
from tiny_models import write_tiny_gemma3, write_tiny_llama

pytestmark = pytest.mark.skipif(not native_abi.available(), reason="no native library")


def _logits(llm, prompt: list[int], n_steps: int, chunk: int) -> list[np.ndarray]:
    """Last-row logits after each prompt chunk, then after each greedy decode step."""
    model, cache, out = llm.lm.model, llm.cache, []
    with no_grad():
        for s in range(0, len(prompt), chunk):
            out.append(host(model.forward(prompt[s : s + chunk], cache, "last").logits[-1]))
        for _ in range(n_steps):
            tok = int(np.argmax(out[-1]))
            out.append(host(model.forward([tok], cache, "last").logits[-1]))
    return out


def _both(path, **kw):
    lean = LLM.load(path, runtime="lean", **kw)
    ref = LLM.load(path, runtime="torch", **kw)
    assert isinstance(lean.lm, LeanLoaded) and isinstance(lean.cache, LeanKV)
    assert not isinstance(ref.lm, LeanLoaded)
    return lean, ref


@pytest.mark.parametrize(
    "write, type_k",
    [(write_tiny_llama, "f16"), (write_tiny_llama, "f32"), (write_tiny_gemma3, "f16"),
     (write_tiny_gemma3, "q8_0"), (write_tiny_gemma3, "q4_0")],
)  # fmt: skip
def test_tiny_models_same_bits_as_the_torch_path(tmp_path, write, type_k):
    """Chunks of 16 rows (the torch path runs them op by op), a chunk of 6 and 1-row steps (its
    whole-block call); 150 positions wrap the tiny Gemma's sliding rings (8 + 64 slots)."""
    path = write(tmp_path / "m.gguf")
    lean, ref = _both(path, n_ctx=256, n_ubatch=16, type_k=type_k, type_v=type_k)
    prompt = [(7 * i + 3) % 300 + 1 for i in range(38)]
    got, want = _logits(lean, prompt, 112, 16), _logits(ref, prompt, 112, 16)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(a, b), f"step {i}: max diff {np.abs(a - b).max()}"


@pytest.mark.parametrize("name", ["smollm_gguf", "gemma_gguf"])
def test_real_models_same_bits_and_tokens(request, name):
    path = request.getfixturevalue(name)
    lean, ref = _both(path, n_ctx=512)
    prompt = lean.tokenize("The capital of France is Paris, and the capital of Italy is")
    for a, b in zip(_logits(lean, prompt, 8, 512), _logits(ref, prompt, 8, 512), strict=True):
        assert np.array_equal(a, b)
    lean.cache.clear(), ref.cache.clear()
    lean.history, ref.history = [], []
    kw = {"n_predict": 24, "temp": 0.9, "seed": 11}  # one sampler, one generator: same tokens
    assert lean.generate("Once upon a time", **kw) == ref.generate("Once upon a time", **kw)


def test_chat_turns_reuse_the_cache(tmp_path):
    """A second prompt sharing the first's prefix evaluates only its new tokens (truncate), and
    gives what a fresh model gives."""
    path = write_tiny_gemma3(tmp_path / "g.gguf")
    lm = LLM.load(path, runtime="lean", n_ctx=256, n_ubatch=16)
    first = [5 + i % 50 for i in range(90)]  # past the ring: rolling back to 80 must fail over
    lm.generate(first, n_predict=4, temp=0)
    again = first[:60] + [9, 8, 7]
    got = lm.generate(again, n_predict=12, temp=0)
    fresh = LLM.load(path, runtime="lean", n_ctx=256, n_ubatch=16)
    assert got == fresh.generate(again, n_predict=12, temp=0)


def test_kv_rollback_inside_and_past_the_ring(tmp_path):
    from llmkit.core.cache.layout import LayerKV

    kv = LeanKV({0: LayerKV(1, 32, 32, window=4), 1: LayerKV(1, 32, 32)}, 64, margin=8)
    kv.begin(6)
    kv.truncate(5)  # positions 1..4 still in the 12-slot ring
    assert kv.n_past == 5 and kv.groups["swa4"].slot_pos.tolist().count(-1) == 7
    kv.begin(8), kv.begin(2)  # positions 5..14: slots 0..2 now hold 12..14
    assert kv.groups["swa4"].slot_pos[:3].tolist() == [12, 13, 14]
    kv.truncate(13)  # the window before 13 (9..12) is still there
    with pytest.raises(LlmkitError, match="already overwrote"):
        kv.truncate(6)  # it needs 2..5
    with pytest.raises(LlmkitError, match="context is full"):
        kv.begin(64)


def test_forced_where_it_cannot_run_is_one_line(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf")
    with pytest.raises(LlmkitError, match="plain decoding on a CPU"):
        LLM.load(path, runtime="lean", type_k="turbo3")
    with pytest.raises(LlmkitError, match="runtime must be"):
        LLM.load(path, runtime="fast")


def test_llm_run_never_imports_torch(smollm_gguf):
    """`llm run` on a model the runtime serves completes with torch unimportable."""
    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not importable here")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["llm", "run", "-m", {str(smollm_gguf)!r}, "-p", "Hello", "-n", "4", "--temp", "0"]
from llmkit.cli.app import main
main()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "eval time" in r.stderr and r.stdout.startswith("Hello")


def test_gguf_rows_and_x8_groups_give_the_same_bits(tmp_path):
    """--no-repack (the kernels read the GGUF rows) against x8 groups, on the runtime."""
    path = write_tiny_gemma3(tmp_path / "g.gguf")
    rows = LLM.load(path, runtime="lean", n_ctx=128, n_ubatch=16, repack=False)
    x8 = LLM.load(path, runtime="lean", n_ctx=128, n_ubatch=16)
    assert not rows.lm.backend.packed and x8.lm.backend.packed
    prompt = [(5 * i + 2) % 300 + 1 for i in range(20)]
    for a, b in zip(_logits(rows, prompt, 6, 16), _logits(x8, prompt, 6, 16), strict=True):
        assert np.array_equal(a, b)


def test_gemma_window_ring_wraps_with_the_same_bits(gemma_gguf):
    """A 700-token prompt in chunks of 64 and 40 steps: the 512-token window's ring (512 + 64
    slots) wraps, and every row's logits stay the torch path's."""
    lean, ref = _both(gemma_gguf, n_ctx=2048, n_ubatch=64)
    assert lean.cache.plan()["groups"]["swa512"]["cells"] == 576
    prompt = lean.tokenize("The history of the city " * 140)[:700]
    for a, b in zip(_logits(lean, prompt, 40, 64), _logits(ref, prompt, 40, 64), strict=True):
        assert np.array_equal(a, b)
