"""The native row ops, cache write, attention and fused linear (kernels/cpu_ops.py, the fused call
of cpu_native.NativeLinear) against PyTorch references, on irregular shapes, and their batch
invariance (a row computes the same bits alone or in a batch)."""

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native, cpu_ops, torch_ops
from llmkit.kernels.rope import ROPE_NEOX, ROPE_NORM, rope_cache
from llmkit.quant.dequant import dequantize
from llmkit.quant.quantize import quantize

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="native library not built")
KINDS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": QT.Q8_0,
         "q4_0": QT.Q4_0}  # fmt: skip


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_rms_norm_rope_glu_match_torch():
    g = _g(0)
    x, w = torch.randn(5, 72, generator=g), torch.rand(72, generator=g)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), torch_ops.rms_norm(x, w, 1e-5))
    q = torch.randn(4, 3, 40, generator=g)
    cos, sin = rope_cache(torch.tensor([0, 5, 9, 700]), 24, 10000.0)  # partial rotation
    nw = torch.rand(40, generator=g)
    for mode in (ROPE_NORM, ROPE_NEOX):
        want = torch_ops.rope(torch_ops.rms_norm(q, nw, 1e-6), cos, sin, mode) * 0.3
        got = cpu_ops.rope(q, cos, sin, mode, (nw, 1e-6), 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, q)  # a copy: the input is untouched
    gu = torch.randn(3, 2 * 37, generator=g) * 3
    gu[0, :4] = torch.tensor([-12.0, 11.0, -95.0, 0.0])  # the clamps, e^-|x| underflow, zero
    torch.testing.assert_close(cpu_ops.glu(gu, "silu"), torch_ops.glu(gu, "silu"))
    # GELU as llama.cpp's CPU backend: a table over fp16 inputs of fp16 results (~1e-3 relative)
    gate, up = gu[:, :37], gu[:, 37:]
    v = gate.half().float()
    table = (0.5 * v * (1 + torch.tanh(0.7978845608028654 * v * (1 + 0.044715 * v * v)))).half()
    act = torch.where(gate <= -10, 0.0, torch.where(gate >= 10, gate, table.float()))
    got = cpu_ops.glu(gu, "gelu_fp16")
    assert torch.equal(got, act * up)
    exact = torch_ops.glu(gu, "gelu_tanh")
    torch.testing.assert_close(cpu_ops.glu(gu, "gelu_tanh"), exact)
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu_fp16"])
def test_glu_is_the_same_bits_on_every_isa_and_alone(act):
    gu = torch.randn(40, 2 * 1037, generator=_g(5)) * 4  # enough rows to split across threads
    best = cpu_ops.glu(gu, act)
    assert torch.equal(torch.cat([cpu_ops.glu(gu[i : i + 1], act) for i in range(40)]), best)
    for isa in cpu_native.supported_isas():
        with cpu_native.use_isa(isa):
            assert torch.equal(cpu_ops.glu(gu, act), best), isa


@pytest.mark.parametrize("kind", list(KINDS))
def test_kv_store_writes_the_cache_format(kind):
    g = _g(1)
    x = torch.randn(3, 2, 64, generator=g)  # [T, H, D]
    t = KINDS[kind]
    row = 64 if isinstance(t, torch.dtype) else (64 // 32) * (34 if t == QT.Q8_0 else 18)
    buf = torch.zeros(2, 8, row, dtype=t if isinstance(t, torch.dtype) else torch.uint8)
    slots = torch.tensor([6, 1, 3])
    cpu_ops.kv_store(buf, t, slots, x)
    want = x.transpose(0, 1)
    if isinstance(t, torch.dtype):
        assert torch.equal(buf[:, slots], want.to(t))
    else:  # byte-identical to the reference quantizer (ggml's formulas)
        assert torch.equal(buf[:, slots], quantize(want, t))


def _reference_attention(q, k, v, mask, scale, k_kind, v_kind):
    """SDPA on the cache's decoded rows, with llama.cpp's roundings: q to K's dot format, the
    probabilities to V's float type."""
    if k_kind in (torch.float16, torch.bfloat16):
        q = q.to(k_kind).float()
    elif k_kind != torch.float32:  # q8_0 blocks
        q = dequantize(quantize(q, QT.Q8_0), QT.Q8_0).view(q.shape)
    T, Hq, _ = q.shape
    G = Hq // k.shape[0]
    s = torch.einsum("thd,hsd->ths", q, k.repeat_interleave(G, 0)) * scale
    p = s.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    if v_kind in (torch.float16, torch.bfloat16):
        p = p.to(v_kind).float()
    return torch.einsum("ths,hsd->thd", p, v.repeat_interleave(G, 0)).reshape(T, -1)


def _cache(kind, x):
    """x [Hkv, S, D] fp32 -> (buffer in the cache format, its decoded rows)."""
    t = KINDS[kind]
    if isinstance(t, torch.dtype):
        return x.to(t), x.to(t).float()
    b = quantize(x, t)
    return b, dequantize(b, t).view(x.shape)


@pytest.mark.parametrize("k_kind, v_kind", [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"),
                                            ("q8_0", "f16"), ("q4_0", "q8_0")])  # fmt: skip
@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_reference_and_is_batch_invariant(k_kind, v_kind, window):
    g = _g(2)
    Hq, Hkv, D, S, T = 6, 2, 64, 23, 7
    kf, vf = torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g)
    kb, kd = _cache(k_kind, kf)
    vb, vd = _cache(v_kind, vf)
    kpos = torch.randperm(S, generator=g)  # slots hold positions in any order (a ring)
    kpos[kpos == 0] = -1  # one empty slot
    qpos = torch.arange(S - T, S)
    q = torch.randn(T, Hq, D, generator=g)
    kt, vt = KINDS[k_kind], KINDS[v_kind]
    out = cpu_ops.attention(q, kb, kt, vb, vt, D, S, kpos, qpos, 0.125, window)
    mask = (kpos[None] >= 0) & (kpos[None] <= qpos[:, None])
    if window:
        mask &= qpos[:, None] - kpos[None] < window
    want = _reference_attention(q, kd, vd, mask, 0.125, kt, vt)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    rows = [cpu_ops.attention(q[i : i + 1], kb, kt, vb, vt, D, S, kpos, qpos[i : i + 1], 0.125,
                              window) for i in range(T)]  # fmt: skip
    assert torch.equal(torch.cat(rows), out)
    # an explicit mask over physical slots (the paged pool's form) gives the same numbers
    order = torch.argsort(kpos)
    sel = order[kpos[order] >= 0]
    by_mask = cpu_ops.attention(q, kb, kt, vb, vt, D, sel.numel(), None, qpos, 0.125, None,
                                mask[:, sel], sel)  # fmt: skip
    assert torch.equal(by_mask, out)


def test_attention_with_nothing_visible_gives_zeros():
    kb = torch.zeros(1, 4, 32)
    kpos = torch.full((4,), -1)
    out = cpu_ops.attention(torch.ones(1, 2, 32), kb, torch.float32, kb, torch.float32, 32, 4,
                            kpos, torch.tensor([3]), 1.0, None)  # fmt: skip
    assert torch.equal(out, torch.zeros(1, 64))


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q4_K])
def test_fused_linear_is_the_separate_calls(qtype):
    g = _g(3)
    K, N = 256, 48
    w = quantize(torch.randn(N, K, generator=g), qtype)
    lin = cpu_native.NativeLinear([(w, qtype, (N, K))])
    x, r = torch.randn(5, K, generator=g), torch.randn(5, N, generator=g)
    nw, pw = torch.rand(K, generator=g), torch.rand(N, generator=g)
    got = lin.fused(x, norm=(nw, 1e-5), post_norm=(pw, 1e-6), residual=r)
    want = r + cpu_ops.rms_norm(lin(cpu_ops.rms_norm(x, nw, 1e-5)), pw, 1e-6)
    assert torch.equal(got, want)
    gu = torch.randn(5, 2 * K, generator=g)
    assert torch.equal(lin.fused(gu, glu="silu"), lin(cpu_ops.glu(gu, "silu")))
    rows = torch.cat([lin.fused(gu[i : i + 1], glu="gelu_tanh") for i in range(5)])
    assert torch.equal(rows, lin.fused(gu, glu="gelu_tanh"))


@pytest.mark.parametrize("k_kind, v_kind, D", [("f16", "f16", 64), ("bf16", "f16", 44),
                                               ("f16", "bf16", 44), ("q8_0", "q4_0", 64),
                                               ("f16", "q8_0", 96), ("q8_0", "q8_0", 96),
                                               ("q4_0", "f16", 96)])  # fmt: skip
def test_attention_is_the_same_bits_on_every_isa(k_kind, v_kind, D):
    """Each ISA's decoders (vector row conversions with scalar tails) and micro-kernels: one result."""
    g = _g(4)
    kb, _ = _cache(k_kind, torch.randn(2, 40, D, generator=g))
    vb, _ = _cache(v_kind, torch.randn(2, 40, D, generator=g))
    q, kpos, qpos = torch.randn(11, 6, D, generator=g), torch.arange(40), torch.arange(29, 40)
    for t, window in ((11, 16), (1, 0), (2, 0), (1, 37)):  # few rows: the slot-vectorized dots
        args = (kb, KINDS[k_kind], vb, KINDS[v_kind], D, 40, kpos, qpos[-t:], 0.125, window)
        best = cpu_ops.attention(q[-t:], *args)
        for isa in cpu_native.supported_isas():
            with cpu_native.use_isa(isa):
                assert torch.equal(cpu_ops.attention(q[-t:], *args), best), (isa, t)


@pytest.mark.parametrize("G, hkv, D, S, kind", [(1, 2, 64, 45, "f16"), (2, 1, 64, 45, "f16"),
                                                  (4, 1, 256, 530, "f16"), (5, 1, 64, 2100, "f16"),
                                                  (7, 2, 64, 61, "f16"), (8, 1, 64, 2050, "f16"),
                                                  (3, 3, 64, 2060, "f16"), (3, 2, 64, 45, "bf16"),
                                                  (4, 1, 32, 45, "f32"), (3, 3, 64, 700, "q8_0"),
                                                  (4, 1, 256, 300, "q4_0"),
                                                  (5, 2, 64, 90, "q8_0")])  # fmt: skip
def test_few_lane_attention_is_the_same_bits_on_every_isa(G, hkv, D, S, kind):
    """The decode kernels for 1-16 query lanes per KV head (slot-vectorized dots, 9-16 lanes in
    two groups; in-place V for the weighted sum), with and without the phase split of longer
    contexts (S (Dk + Dv) >= 2^16: Gemma-like 256-wide heads from 128 slots, 64-wide ones from
    512): one result on every ISA, and a verify batch's row equals the row alone."""
    g = _g(G * 100 + S)
    kb, kf = _cache(kind, torch.randn(hkv, S, D, generator=g))
    vb, vf = _cache(kind, torch.randn(hkv, S, D, generator=g))
    q, kpos = torch.randn(3, G * hkv, D, generator=g), torch.arange(S)
    for t in (1, 2, 3):
        args = (kb, KINDS[kind], vb, KINDS[kind], D, S, kpos, torch.arange(S - t, S), 0.1, 0)
        best = cpu_ops.attention(q[-t:], *args)
        qh = q[-t:].double().view(t, hkv, G, D)  # reference: causal softmax in float64
        s = torch.einsum("thgd,hsd->thgs", qh, kf.double()) * 0.1
        s = s.masked_fill(torch.arange(S) > torch.arange(S - t, S).view(t, 1, 1, 1), float("-inf"))
        ref = torch.einsum("thgs,hsd->thgd", s.softmax(-1), vf.double()).reshape(t, -1)
        atol = 2e-3 if kind in ("f16", "bf16", "f32") else 2e-2  # q8_0 / q4_0: the query too
        torch.testing.assert_close(best.double(), ref, atol=atol, rtol=0)
        for isa in cpu_native.supported_isas():
            with cpu_native.use_isa(isa):
                assert torch.equal(cpu_ops.attention(q[-t:], *args), best), (isa, t)
        if t > 1:  # the last row inside the verify batch = the row alone
            one = args[:7] + (torch.arange(S - 1, S),) + args[8:]
            assert torch.equal(cpu_ops.attention(q[-1:], *one), best[-1:])


@pytest.mark.parametrize("G, hkv, D, S", [(4, 1, 256, 200), (4, 1, 256, 530), (3, 3, 64, 600)])
def test_decode_attention_schedules_give_the_same_bits(G, hkv, D, S):
    """Decode attention splits a few units' work in phases over the threads (from S (Dk + Dv)
    >= 2^16) or runs each unit in one chunk (one thread): the same arithmetic, so one thread
    and two give the same bits."""
    g = _g(S + D)
    kb, _ = _cache("f16", torch.randn(hkv, S, D, generator=g))
    vb, _ = _cache("f16", torch.randn(hkv, S, D, generator=g))
    q = torch.randn(2, G * hkv, D, generator=g)
    args = (
        kb,
        KINDS["f16"],
        vb,
        KINDS["f16"],
        D,
        S,
        torch.arange(S),
        torch.arange(S - 2, S),
        0.1,
        0,
    )
    n = cpu_native.get_threads()
    try:
        out = []
        for threads in (1, 2):
            cpu_native.set_threads(threads)
            out.append(cpu_ops.attention(q, *args))
    finally:
        cpu_native.set_threads(n)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("n", [1, 7, 16, 17, 33, 1000, 49157])
def test_argmax_is_torch_argmax_on_every_isa(n):
    """First maximum on ties, first NaN when there is one (torch's choice), all -inf -> 0."""
    g = _g(n)
    rows = [torch.randn(n, generator=g), torch.round(torch.randn(n, generator=g) * 2) / 2,
            torch.full((n,), float("-inf")), torch.zeros(n)]  # fmt: skip
    nan = torch.randn(n, generator=g)
    nan[torch.randint(0, n, (2,), generator=g)] = float("nan")
    rows.append(nan)
    big = torch.randn(n, generator=g)
    big[n // 2] = float("inf")
    rows.append(big)
    for isa in cpu_native.supported_isas():
        with cpu_native.use_isa(isa):
            for x in rows:
                assert cpu_ops.argmax(x) == int(torch.argmax(x)), (isa, x[:8])


@pytest.mark.parametrize("n", [1, 7, 9, 16, 1000, 8195])
def test_argmax_prob_is_the_softmax_of_the_maximum_on_every_isa(n):
    """argmax_prob: the argmax's index and its softmax probability (torch's within 2e-6), the
    same bits on every ISA; -inf entries weigh nothing; a NaN or inf maximum gives 0."""
    g = _g(n)
    ties = torch.round(torch.randn(n, generator=g) * 2) / 2
    masked = torch.randn(n, generator=g) * 4
    masked[torch.rand(n, generator=g) < 0.5] = float("-inf")
    masked[n // 3] = 1.0
    rows = [torch.randn(n, generator=g) * 3, ties, masked, torch.zeros(n)]
    nan, inf = torch.randn(n, generator=g), torch.randn(n, generator=g)
    nan[n // 2], inf[n // 2] = float("nan"), float("inf")
    for x in rows:
        got = set()
        for isa in cpu_native.supported_isas():
            with cpu_native.use_isa(isa):
                i, p = cpu_ops.argmax_prob(x)
            got.add((i, p))
            assert i == int(torch.argmax(x))
            assert abs(p - float(torch.softmax(x.double(), -1)[i])) <= 2e-6, (isa, p)
        assert len(got) == 1, got
    for x in (nan, inf):
        for isa in cpu_native.supported_isas():
            with cpu_native.use_isa(isa):
                assert cpu_ops.argmax_prob(x) == (int(torch.argmax(x)), 0.0)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099])
def test_all_finite_on_every_isa(n):
    g = _g(n)
    for isa in cpu_native.supported_isas():
        with cpu_native.use_isa(isa):
            x = torch.randn(n, generator=g) * 1e30
            assert cpu_ops.all_finite(x)
            for bad in (float("nan"), float("inf"), float("-inf")):
                for at in {0, n // 2, n - 1}:
                    y = x.clone()
                    y[at] = bad
                    assert not cpu_ops.all_finite(y), (isa, bad, at)


def test_layer_attention_reads_strided_projection_views_in_place():
    """q/k/v as views of one [T, (Hq + 2 Hkv) * D] projection (rows strided) give the bits of
    contiguous copies, and the cache receives the same rows."""
    g = _g(5)
    T, Hq, Hkv, D, S = 3, 4, 2, 32, 16
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    q, k, v = (t.view(T, -1, D) for t in qkv.split((Hq * D, Hkv * D, Hkv * D), dim=-1))
    outs, caches = [], []
    for views in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        kb, vb = (
            torch.zeros(Hkv, S, D, dtype=torch.float16),
            torch.zeros(Hkv, S, D, dtype=torch.float16),
        )
        step = cpu_ops.LayerAttention(kb, torch.float16, vb, torch.float16, D)
        kpos = torch.full((S,), -1, dtype=torch.long)
        slots = torch.arange(5, 5 + T)
        kpos[slots] = slots
        outs.append(step(*views, slots, S, kpos, slots.clone(), 0.2, None))
        caches.append((kb, vb))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1], strict=True))


@pytest.mark.parametrize("qtype", sorted(cpu_native.SUPPORTED_TYPES), ids=lambda t: t.name)
def test_embed_rows_are_the_torch_decode_bit_for_bit(qtype):
    from llmkit.kernels import ops
    from llmkit.quant.tensor import QTensor

    g = _g(11)
    V, K = 9, 512
    x = torch.randn(V, K, generator=g)
    floats = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
    raw = x.to(floats[qtype]).view(torch.uint8) if qtype in floats else quantize(x, qtype)
    w = QTensor("token_embd.weight", qtype, (V, K), raw)
    ids = torch.tensor([3, 0, 8, 3, 5])
    for scale in (None, 25.298221281347036):  # Gemma's sqrt(640)
        want = dequantize(w.raw[ids], qtype)
        want = want * scale if scale is not None else want
        got = ops.embed_site(w, scale)(ids)
        assert got.dtype == torch.float32 and torch.equal(got, want), qtype.name
    with pytest.raises(LlmkitError, match=r"token ids must lie in \[0, 9\)"):
        ops.embed_site(w)(torch.tensor([1, 9]))


def test_rms_norm_cat_is_the_cat_of_the_norms():
    from llmkit.kernels import ops

    g = _g(12)
    e, h = torch.randn(3, 40, generator=g), torch.randn(6, 56, generator=g)[::2, :48] * 7
    w1, w2 = torch.rand(40, generator=g), torch.rand(48, generator=g)
    want = torch.cat((cpu_ops.rms_norm(e, w1, 1e-6), cpu_ops.rms_norm(h, w2, 1e-6)), -1)
    assert torch.equal(ops.rms_norm_cat(((e, w1), (h, w2)), 1e-6), want)  # h: strided rows
    torch.testing.assert_close(want[:, :40], torch_ops.rms_norm(e, w1, 1e-6))
