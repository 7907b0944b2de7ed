"""Tiny random llama and gemma3 models: the cached, fused forward equals a naive full-sequence
reference written independently here, incremental decoding equals one batch, and the sliding window
changes the result once the sequence outgrows it."""

import math

import pytest
import torch

from llmkit.core.models.loader import load_model
from tiny_models import write_tiny_gemma3, write_tiny_llama


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, base, neox):  # x [T, H, D], all dims rotated
    D = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(D // 2):
        a, b = (i, i + D // 2) if neox else (2 * i, 2 * i + 1)
        th = pos.double() * base ** (-2 * i / D)
        c, s = torch.cos(th).float()[:, None], torch.sin(th).float()[:, None]
        out[..., a], out[..., b] = x[..., a] * c - x[..., b] * s, x[..., a] * s + x[..., b] * c
    return out


def _attn(q, k, v, scale, window=None):  # q [T,Hq,D], k/v [T,Hkv,D]; causal (+ window)
    T, Hq, _ = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(T, Hq, v.shape[-1])
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        for h in range(Hq):
            s = (k[lo : t + 1, h // g] @ q[t, h]) * scale
            out[t, h] = torch.softmax(s, 0) @ v[lo : t + 1, h // g]
    return out.reshape(T, -1)


def _W(lm, name):
    return lm.tensors[name].dequantize()


def naive_llama(lm, tokens):
    c = lm.config
    x = _W(lm, "token_embd.weight")[tokens]
    pos = torch.arange(len(tokens))
    for i in range(c.n_layer):
        b = f"blk.{i}."
        a = _rms(x, _W(lm, b + "attn_norm.weight"), c.eps)
        q = (a @ _W(lm, b + "attn_q.weight").T).view(len(tokens), c.n_head, -1)
        k = (a @ _W(lm, b + "attn_k.weight").T).view(len(tokens), c.n_head_kv, -1)
        v = (a @ _W(lm, b + "attn_v.weight").T).view(len(tokens), c.n_head_kv, -1)
        q, k = _rope(q, pos, c.rope_base, False), _rope(k, pos, c.rope_base, False)
        x = x + _attn(q, k, v, 1 / math.sqrt(c.head_dim)) @ _W(lm, b + "attn_output.weight").T
        f = _rms(x, _W(lm, b + "ffn_norm.weight"), c.eps)
        h = torch.nn.functional.silu(f @ _W(lm, b + "ffn_gate.weight").T) * (
            f @ _W(lm, b + "ffn_up.weight").T
        )
        x = x + h @ _W(lm, b + "ffn_down.weight").T
    return _rms(x, _W(lm, "output_norm.weight"), c.eps) @ _W(lm, "token_embd.weight").T


def naive_gemma3(lm, tokens, window):
    c = lm.config
    x = _W(lm, "token_embd.weight")[tokens] * math.sqrt(c.n_embd)
    pos, T = torch.arange(len(tokens)), len(tokens)
    for i in range(c.n_layer):
        b = f"blk.{i}."
        local = i % 6 != 5
        a = _rms(x, _W(lm, b + "attn_norm.weight"), c.eps)
        q = _rms(
            (a @ _W(lm, b + "attn_q.weight").T).view(T, c.n_head, -1),
            _W(lm, b + "attn_q_norm.weight"),
            c.eps,
        )
        k = _rms(
            (a @ _W(lm, b + "attn_k.weight").T).view(T, c.n_head_kv, -1),
            _W(lm, b + "attn_k_norm.weight"),
            c.eps,
        )
        v = (a @ _W(lm, b + "attn_v.weight").T).view(T, c.n_head_kv, -1)
        base = 10000.0 if local else c.rope_base
        q, k = _rope(q, pos, base, True), _rope(k, pos, base, True)
        o = _attn(q, k, v, 1 / math.sqrt(c.head_dim), window if local else None)
        x = x + _rms(
            o @ _W(lm, b + "attn_output.weight").T, _W(lm, b + "post_attention_norm.weight"), c.eps
        )
        f = _rms(x, _W(lm, b + "ffn_norm.weight"), c.eps)
        h = torch.nn.functional.gelu(f @ _W(lm, b + "ffn_gate.weight").T, approximate="tanh")
        h = (h * (f @ _W(lm, b + "ffn_up.weight").T)) @ _W(lm, b + "ffn_down.weight").T
        x = x + _rms(h, _W(lm, b + "post_ffw_norm.weight"), c.eps)
    return _rms(x, _W(lm, "output_norm.weight"), c.eps) @ _W(lm, "token_embd.weight").T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {
        "llama": write_tiny_llama(d / "llama.gguf"),
        "gemma3": write_tiny_gemma3(d / "gemma3.gguf"),
    }


TOKENS = torch.tensor(
    [1, 17, 300, 5, 260, 261, 44, 9, 270, 120, 3, 77, 265, 290, 8, 263, 11, 200, 31, 4]
)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_forward_matches_naive_reference(tiny, arch):
    lm = load_model(tiny[arch], kernels="torch")
    with torch.inference_mode():
        cache = lm.new_cache(64, margin=32, type_k="f32", type_v="f32")
        got = lm.model.forward(TOKENS, cache, logits="all").logits
        ref = naive_llama(lm, TOKENS) if arch == "llama" else naive_gemma3(lm, TOKENS, window=8)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_incremental_decode_equals_one_batch(tiny, arch, kv):
    """A row's logits do not depend on how many rows its batch has: bit for bit on the default
    (native) path, whatever the CPU, through a sliding ring that wraps."""
    lm = load_model(tiny[arch])
    with torch.inference_mode():
        full = lm.model.forward(TOKENS, lm.new_cache(64, 32, kv, kv), logits="all").logits
        cache = lm.new_cache(64, 4, kv, kv)  # ring of 8 + 4 slots: it wraps during this run
        steps = [lm.model.forward(TOKENS[:3], cache, logits="all").logits]
        steps += [lm.model.forward(TOKENS[i : i + 1], cache).logits for i in range(3, len(TOKENS))]
        assert torch.equal(torch.cat(steps), full)
        ref = load_model(tiny[arch], kernels="torch")  # and it stays near the fp32 math
        want = ref.model.forward(TOKENS, ref.new_cache(64, 32), logits="all").logits
    assert float((full - want).norm() / want.norm()) < 0.02


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_verify_sized_batches_equal_one_batch(tiny, arch):
    """Batches of 2-8 rows (MTP verify batches: their blocks run on bound per-M buffers) give
    each row the bits the whole sequence in one batch gives it."""
    lm = load_model(tiny[arch])
    with torch.inference_mode():
        full = lm.model.forward(TOKENS, lm.new_cache(64, 32), logits="all").logits
        cache, steps, i = lm.new_cache(64, 8), [], 0
        for n in (2, 5, 1, 3, 8, 4, 2, 6, 7):
            if i < len(TOKENS):
                steps.append(lm.model.forward(TOKENS[i : i + n], cache, logits="all").logits)
                i += n
        assert torch.equal(torch.cat(steps), full[: sum(s.shape[0] for s in steps)])


def test_gemma3_window_matters(tiny):
    lm = load_model(tiny["gemma3"], kernels="torch")
    with torch.inference_mode():
        got = lm.model.forward(TOKENS, lm.new_cache(64, 32, "f32", "f32"), logits="all").logits
        no_window = naive_gemma3(lm, TOKENS, window=None)
    # identical while the sequence fits the window (8), different after
    torch.testing.assert_close(got[:8], no_window[:8], rtol=1e-4, atol=1e-4)
    assert (got[10:] - no_window[10:]).abs().max() > 1e-2


def test_bf16_backend_stays_close(tiny):
    ref = load_model(tiny["llama"], kernels="torch")
    lm = load_model(tiny["llama"], kernels="torch", weight_dtype=torch.bfloat16)
    with torch.inference_mode():
        a = ref.model.forward(TOKENS, ref.new_cache(64), logits="all").logits
        b = lm.model.forward(TOKENS, lm.new_cache(64), logits="all").logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert lm.backend.extra_bytes > 0 and lm.memory_plan()["backend_weight_dtype"] == "bfloat16"


@pytest.mark.parametrize("kv", ["f16", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_native_block_and_stack_calls_are_the_separate_calls(tiny, arch, kv, monkeypatch):
    """Decode and verify steps on the native KV cache run all blocks in one native call
    (kernels/cpu_block.StackSite), or each block in one (BlockSite) where the cache offers no
    stack: the same bits as the blocks' separate kernel calls, through a sliding ring that wraps
    and a draft-tree mask."""
    from llmkit.core.cache.kv import KVCache
    from llmkit.kernels import cpu_block

    lm = load_model(tiny[arch])
    calls = {"stack": 0, "block": 0}
    for cls, name in ((cpu_block.StackSite, "stack"), (cpu_block.BlockSite, "block")):
        orig = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda *a, o=orig, n=name: calls.__setitem__(n, calls[n] + 1) or o(*a))  # fmt: skip

    def run():
        with torch.inference_mode():
            cache, out, i = lm.new_cache(64, 4, kv, kv), [], 0
            for n in (3, 1, 2, 1, 4, 1, 1, 3, 1):
                out.append(lm.model.forward(TOKENS[i : i + n], cache, logits="all").logits)
                i += n
            with cache.tree_batch([-1, 0, 0]):  # a root and two siblings
                out.append(lm.model.forward(TOKENS[i : i + 3], cache, logits="all").logits)
        return torch.cat(out)

    stacked = run()
    assert calls == {"stack": 10, "block": 0}
    monkeypatch.setattr(KVCache, "native_stack", lambda self, layers: None)
    assert torch.equal(run(), stacked) and calls == {"stack": 10, "block": 10 * lm.config.n_layer}
    monkeypatch.setattr(KVCache, "native_step", lambda self, il: None)
    assert torch.equal(run(), stacked) and calls["block"] == 10 * lm.config.n_layer
