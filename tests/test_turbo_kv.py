"""turbo3 / turbo4 KV caches: the codes against a float64 reference of the same algorithm, the
byte layout, attention over the codes in the rotated basis against attention on the decoded
vectors, the kernel-table rule, and models over sliding rings, paged blocks and speculative
rollback."""

import math

import pytest
import torch

from llmkit.core.cache.batch import BatchCache
from llmkit.core.cache.kv import KVCache
from llmkit.core.cache.layout import LayerKV
from llmkit.core.cache.paged import PagedKV
from llmkit.core.cache.turbo import TURBO_TYPES, signs
from llmkit.core.decode.early_exit import early_exit_spec
from llmkit.core.decode.loop import generate
from llmkit.core.decode.sampling import Sampler, SamplerParams
from llmkit.core.decode.speculative import SpecConfig
from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError
from llmkit.kernels import ops
from tiny_models import write_tiny_gemma3, write_tiny_llama

# the spec's codebooks (GEMMA4_TURBOQUANT.md 3.2), for N(0, 1/128)
BOOKS = {
    "turbo3": [0.021460, 0.065717, 0.117832, 0.190685],
    "turbo4": [0.011353, 0.034311, 0.058069, 0.083317, 0.111065, 0.143047, 0.182907, 0.241556],
}


def reference(x: torch.Tensor, kind: str):
    """float64, one group at a time, written from the spec: (indices, corrected norm, decoded)."""
    D = x.shape[-1]
    g = 128 if D % 128 == 0 else 64
    H = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(g)] for i in range(g)])
    s1, s2 = (s[:g] for s in signs())
    half = torch.tensor(BOOKS[kind], dtype=torch.float64) * math.sqrt(128 / g)
    c = torch.cat((-half.flip(0), half))
    idx_all, norms, dec = [], [], []
    for grp in x.double().reshape(-1, g):
        n = grp.norm()
        u = grp / n if n > 1e-10 else torch.zeros_like(grp)
        y = s2 * (H.double() @ (s1 * u)) / math.sqrt(g)
        idx = torch.tensor([sum(1 for m in (c[1:] + c[:-1]) / 2 if m <= v) for v in y])
        cn = c[idx].norm()
        nc = n / cn if cn > 1e-10 else n
        idx_all.append(idx)
        norms.append(nc)
        dec.append(s1 * (H.double() @ (s2 * c[idx] * nc)) / math.sqrt(g))  # R^T
    return torch.stack(idx_all), torch.stack(norms), torch.cat(dec).reshape(x.shape)


@pytest.mark.parametrize("kind", ["turbo3", "turbo4"])
@pytest.mark.parametrize("D", [64, 256])
def test_codes_match_a_float64_reference(kind, D):
    t = TURBO_TYPES[kind]
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(D)) * 3
    x[3] = 0  # a zero vector stays zero
    q = t.quantize(x)
    g = 128 if D % 128 == 0 else 64
    assert q.shape == (24, D // g * (2 + g * t.bits // 8)) and q.dtype == torch.uint8
    idx, norm, g2 = t.codes(q)
    ref_idx, ref_norm, ref_dec = reference(x, kind)
    assert g2 == g
    same = (idx.reshape(-1, g) == ref_idx).float().mean()
    assert same > 0.999  # fp32 vs fp64 may differ only on a coordinate at a threshold
    torch.testing.assert_close(norm.reshape(-1).double(), ref_norm, rtol=1e-3, atol=0)  # fp16
    dec = t.dequantize(q).double()
    ok = (idx.reshape(24, -1) == ref_idx.reshape(24, -1)).all(-1)
    torch.testing.assert_close(dec[ok], ref_dec[ok], rtol=1e-3, atol=1e-5)  # the fp16 norm
    assert dec[3].abs().max() == 0
    # the decoded vectors keep their norm; the error is the paper's for b bits
    nz = x.norm(dim=-1) > 0
    torch.testing.assert_close(dec[nz].norm(dim=-1), x[nz].double().norm(dim=-1), rtol=2e-3, atol=0)
    mse = ((dec[nz] - x[nz]).pow(2).sum(-1) / x[nz].double().pow(2).sum(-1)).mean()
    assert mse < {"turbo3": 0.045, "turbo4": 0.013}[kind]


@pytest.mark.parametrize("kind", ["turbo3", "turbo4"])
@pytest.mark.parametrize("D", [64, 256])
def test_table_lookup_decodes_exactly_the_indexed_centroids(kind, D):
    t = TURBO_TYPES[kind]
    q = t.quantize(torch.randn(3, 40, D, generator=torch.Generator().manual_seed(D)))
    idx, norm, g = t.codes(q)  # every code of a packed unit, unpacked one by one
    want = (t.table(g, "cpu")[0][idx] * norm).reshape(3, 40, D)
    assert torch.equal(t.dequantize_rotated(q), want)  # the same bits: attention is unchanged
    assert torch.equal(t.dequantize_rotated(q[1, 7:9]), want[1, 7:9])


def test_block_sizes():
    assert TURBO_TYPES["turbo4"].row_bytes(128) == 66 and TURBO_TYPES["turbo3"].row_bytes(128) == 50
    assert TURBO_TYPES["turbo4"].row_bytes(256) == 132 and TURBO_TYPES["turbo3"].row_bytes(64) == 26
    with pytest.raises(LlmkitError, match="multiple of 64"):
        KVCache({0: LayerKV(1, 96, 96)}, 16, 8, "turbo4", "f16")


@pytest.mark.parametrize("tk, tv", [("turbo4", "turbo4"), ("turbo3", "f16"), ("f16", "turbo3")])
def test_attention_over_codes_equals_attention_on_decoded_vectors(tk, tv):
    gen = torch.Generator().manual_seed(1)
    layers = {0: LayerKV(2, 128, 64), 1: LayerKV(2, 128, 64, window=4)}
    cache = KVCache(layers, 32, 8, tk, tv, attn_kernel="native")
    assert cache.attn_kernel == "torch"  # the kernel table's rule for turbo types
    kk, vs = {0: [], 1: []}, {0: [], 1: []}
    for T in (5, 1, 3, 1, 4, 2):  # the window-4 ring (12 slots) wraps
        pos = cache.positions(T)
        cache.begin(pos)
        q = torch.randn(T, 4, 128, generator=gen)
        for il in (0, 1):
            k = torch.randn(T, 2, 128, generator=gen)
            v = torch.randn(T, 2, 64, generator=gen)
            kk[il].append(k)
            vs[il].append(v)
            out = cache.attend(il, q, k, v, 0.1)
            K = torch.cat(kk[il]).transpose(0, 1)
            V = torch.cat(vs[il]).transpose(0, 1)
            Kd = TURBO_TYPES[tk].dequantize(TURBO_TYPES[tk].quantize(K)) if tk != "f16" else K
            Vd = TURBO_TYPES[tv].dequantize(TURBO_TYPES[tv].quantize(V)) if tv != "f16" else V
            P = pos[-1] + 1
            kp = torch.arange(P)
            mask = kp[None] <= pos[:, None]
            if il == 1:
                mask &= kp[None] > pos[:, None] - 4
            want = ops.attention_torch(q, Kd.half().float() if tk == "f16" else Kd,
                                       Vd.half().float() if tv == "f16" else Vd, mask, 0.1)  # fmt: skip
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_paged_pool_uses_the_torch_path_and_plan_reports_bytes():
    pool = PagedKV({0: LayerKV(1, 64, 64)}, 64, 4, type_k="turbo3", type_v="turbo4")
    assert pool.attn_kernel == "torch"
    plan = KVCache({0: LayerKV(1, 256, 256)}, 16, 8, "turbo4", "turbo3").plan()
    assert plan["groups"]["full"]["bytes_per_token_layer"] == {"k": 132, "v": 100}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load_model(write_tiny_gemma3(tmp_path_factory.mktemp("tq") / "g.gguf", head_dim=64))


def greedy(logits, history):
    return int(logits.argmax())


def test_paged_blocks_match_the_contiguous_ring(gemma):
    prompt = [1, 40, 41, 42, 43, 44, 45]
    cache = gemma.new_cache(128, margin=8, type_k="turbo4", type_v="turbo3")  # rings wrap
    want = list(generate(gemma.model, cache, prompt, greedy, 20))
    pool = PagedKV(gemma.model.kv_layout(), 256, 4, n_seq_max=2, max_batch=16,
                   type_k="turbo4", type_v="turbo3")  # fmt: skip
    seq = pool.admit(prompt, len(prompt) + 20, 128, share=False)
    with torch.inference_mode():
        got = []
        toks = prompt
        for _ in range(20):
            lg = gemma.model.forward(torch.tensor(toks), BatchCache(pool, [seq], [len(toks)]))
            got.append(int(lg.logits[0].argmax()))
            toks = got[-1:]
    assert got == want


def test_speculative_rollback_over_turbo_kv(tmp_path):
    lm = load_model(
        write_tiny_llama(tmp_path / "l.gguf", n_layer=4, tied=False, n_embd=128, n_head=2)
    )
    s = Sampler(SamplerParams(temp=0))
    prompt = [2, 40, 41, 42, 43]
    base = list(generate(lm.model, lm.new_cache(96, 8, "turbo4", "turbo4"), prompt, s, 40))
    for k in (1, 3):
        cache = lm.new_cache(96, 8, "turbo4", "turbo4")
        spec = early_exit_spec(lm.model, cache, 3, SpecConfig(draft=k))
        out = list(generate(lm.model, cache, prompt, s, 40, spec=spec))
        assert out == base
        assert 0 < spec.stats.accepted_tokens < spec.stats.draft_tokens
