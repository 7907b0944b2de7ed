"""Triton kernels (kernels/triton_gemv.py, kernels/triton_attention.py) against the torch
references. Without a CUDA device they run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported); with one, compiled on the GPU."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it

from gguf import GGMLQuantizationType as QT  # noqa: E402

from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.kernels.ops import attention_torch as ref_attention  # noqa: E402
from llmkit.kernels.rope import ROPE_NEOX, ROPE_NORM, rope_cache  # noqa: E402
from llmkit.kernels.torch_ops import rope as apply_rope  # noqa: E402
from llmkit.kernels.triton_attention import attention  # noqa: E402
from llmkit.kernels.triton_dequant import qdequant  # noqa: E402
from llmkit.kernels.triton_gemv import qgemv  # noqa: E402
from llmkit.kernels.triton_rope import rope  # noqa: E402
from llmkit.quant.dequant import dequantize  # noqa: E402
from llmkit.quant.quantize import quantize  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRET else ["cuda"]

# Max |error| / max |reference|. The GEMV upcasts x exactly and accumulates in fp32 for every
# x dtype; attention's fp16/bf16 outputs are rounded to their dtype (the interpreter's fp32 ->
# bf16 store truncates instead of rounding: up to 1 bf16 ulp).
GEMV_TOL = 1e-5
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _seed(*key) -> int:
    """A fixed seed per parameter set: fresh inputs for every case, reproducible on failure."""
    return zlib.crc32(repr(key).encode())


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "NaN/inf in the kernel output (unwritten or poisoned)"
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _poison(monkeypatch):
    """Make every torch.empty NaN-filled, so output the kernel fails to write shows up."""
    real_empty = torch.empty

    def empty(*a, **kw):
        t = real_empty(*a, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


# ---------------------------------------------------------------------------------------------
# quantized GEMV

# (type, K) with K = 2-3 blocks (32-element types) or 2-3 super-blocks (K-quants)
GEMV_CASES = [
    (QT.Q8_0, 96),
    (QT.Q4_0, 64),
    (QT.Q4_1, 96),
    (QT.Q5_0, 96),
    (QT.Q4_K, 512),
    (QT.Q6_K, 768),
    (QT.Q5_K, 512),
    (QT.IQ4_XS, 768),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("qtype,K", GEMV_CASES, ids=[c[0].name for c in GEMV_CASES])
def test_qgemv_matches_dequant_matmul(qtype, K, M, xdtype, device, monkeypatch):
    g = torch.Generator().manual_seed(_seed(qtype.name, K, M, xdtype))
    N = int(torch.randint(40, 71, (1,), generator=g))
    w_raw = quantize(torch.randn(N, K, generator=g), qtype).to(device)
    x = torch.randn(M, K, generator=g).to(xdtype).to(device)
    ref = x.float() @ dequantize(w_raw, qtype).T
    _poison(monkeypatch)
    y = qgemv(x, w_raw, qtype)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert _rel_err(y, ref) < GEMV_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.IQ4_XS])
def test_qgemv_dot_path_strided_rows_and_leading_dims(qtype, device, monkeypatch):
    """M >= 16 takes the tl.dot path; W a row slice of a bigger byte array; x [2, 9, K]."""
    g = torch.Generator().manual_seed(7)
    K = 64 if qtype == QT.Q8_0 else 256
    big = quantize(torch.randn(90, 2 * K, generator=g), qtype)  # rows of 2K
    w_raw = big[5:60, : big.shape[1] // 2].to(device)  # 55 rows of K, row stride 2K bytes
    x = torch.randn(2, 9, K, generator=g).to(device)
    ref = x.float() @ dequantize(w_raw.contiguous(), qtype).T
    _poison(monkeypatch)
    y = qgemv(x, w_raw, qtype, block_n=32)
    assert y.shape == (2, 9, 55)
    assert _rel_err(y, ref) < GEMV_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "qtype,K,split,dot", [(QT.Q4_0, 7 * 32, 3, False), (QT.Q6_K, 5 * 256, 2, True)]
)
def test_qgemv_split_k_equals_one_pass(qtype, K, split, dot, device, monkeypatch):
    """Split-K (grid axis 2, partial sums reduced in a fixed order) with a split count that does
    not divide the blocks, on the broadcast and the tl.dot paths (M = 2 padded to 16 rows)."""
    g = torch.Generator().manual_seed(_seed(qtype.name, K, split))
    N = 37
    w_raw = quantize(torch.randn(N, K, generator=g), qtype).to(device)
    x = torch.randn(2, K, generator=g).to(device)
    ref = x.float() @ dequantize(w_raw, qtype).T
    _poison(monkeypatch)
    y = qgemv(x, w_raw, qtype, split_k=split, blocks_per_step=2 if K < 1024 else 1, use_dot=dot)
    assert y.shape == (2, N)
    assert _rel_err(y, ref) < GEMV_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype,K", GEMV_CASES, ids=[c[0].name for c in GEMV_CASES])
def test_qdequant_is_bit_exact(qtype, K, device):
    """The GEMM regime's Triton dequantizer equals the torch decoders (exactly, on CPU)."""
    g = torch.Generator().manual_seed(_seed(qtype.name, K, "dq"))
    w_raw = quantize(torch.randn(21, K, generator=g), qtype).to(device)
    out = qdequant(w_raw, qtype, torch.float32).cpu()
    ref = dequantize(w_raw.cpu(), qtype)
    if device == "cpu":
        assert torch.equal(out, ref)
    else:  # the GPU compiler may fuse d * q - m into one FMA: last-bit differences
        assert _rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype,K", [(QT.Q4_K, 512), (QT.Q8_0, 96)])
def test_qgemv_word_loads_on_misaligned_rows(qtype, K, device):
    """Q4_K quants are read as 32-bit words: rows starting at an odd byte address are realigned
    (copied), not misread; byte-read types (Q8_0) work from any address."""
    g = torch.Generator().manual_seed(_seed(qtype.name, K, "align"))
    w_raw = quantize(torch.randn(9, K, generator=g), qtype)
    store = torch.zeros(w_raw.numel() + 1, dtype=torch.uint8)
    store[1:] = w_raw.reshape(-1)
    w_odd = store.to(device)[1:].view(w_raw.shape)
    assert w_odd.data_ptr() % 2 == 1
    x = torch.randn(2, K, generator=g).to(device)
    ref = x.float() @ dequantize(w_raw, qtype).to(device).T
    assert _rel_err(qgemv(x, w_odd, qtype), ref) < GEMV_TOL


def test_qgemv_rejects_bad_input():
    w = quantize(torch.randn(8, 64), QT.Q8_0)
    with pytest.raises(LlmkitError, match="Q3_K"):
        qgemv(torch.randn(1, 256), quantize(torch.randn(8, 256), QT.Q3_K), QT.Q3_K)
    with pytest.raises(LlmkitError, match="columns"):
        qgemv(torch.randn(1, 32), w, QT.Q8_0)
    with pytest.raises(LlmkitError, match="fp32/fp16/bf16"):
        qgemv(torch.randn(1, 64).double(), w, QT.Q8_0)
    with pytest.raises(LlmkitError, match="uint8"):
        qgemv(torch.randn(1, 64), w.float(), QT.Q8_0)


# ---------------------------------------------------------------------------------------------
# attention


def _kv_layout(S, P, shuffled, g):
    """kpos [S]: positions 0..P-1 in random (or leading) slots, the rest empty (-1)."""
    kpos = torch.full((S,), -1, dtype=torch.int64)
    slots = torch.randperm(S, generator=g)[:P] if shuffled else torch.arange(P)
    kpos[slots] = torch.arange(P)
    return kpos


def _ref(q, k, v, kpos, qpos, scale, window):
    w = window or (1 << 62)
    d = qpos[:, None] - kpos[None, :]
    mask = (kpos[None, :] >= 0) & (d >= 0) & (d < w)
    return ref_attention(q.double(), k.double(), v.double(), mask, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "T,S,window,shuffled",
    [(1, 13, None, True), (3, 40, None, True), (5, 29, None, False), (5, 40, 7, True),
     (3, 37, 9, False), (1, 40, 5, False)],
)  # fmt: skip
def test_attention_matches_reference(T, S, window, shuffled, dtype, device, monkeypatch):
    g = torch.Generator().manual_seed(_seed(T, S, window, shuffled, dtype))
    Hq, Hkv, D = 4, 2, 32
    P = S - 3  # 3 empty slots
    kpos = _kv_layout(S, P, shuffled, g)
    qpos = torch.arange(P - T, P)  # the T newest tokens, already in the cache
    q, k, v = (
        torch.randn(*s, generator=g).to(dtype) for s in ((T, Hq, D), (Hkv, S, D), (Hkv, S, D))
    )
    scale = 0.17
    ref = _ref(q, k, v, kpos, qpos, scale, window)
    _poison(monkeypatch)
    dev = [a.to(device) for a in (q, k, v, kpos, qpos)]
    y = attention(*dev, scale, window)
    assert y.shape == (T, Hq * D) and y.dtype == dtype
    assert _rel_err(y.cpu(), ref) < ATTN_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_attention_skips_invisible_tiles(device):
    """Slots 0..15 hold positions older than every query's window: poisoning their K/V with NaN
    must not reach the output (the tile is skipped, not merely masked)."""
    g = torch.Generator().manual_seed(3)
    T, S, Hq, Hkv, D, window = 3, 40, 4, 2, 32, 8
    kpos = torch.arange(S)
    qpos = torch.arange(S - T, S)
    q, k, v = (torch.randn(*s, generator=g) for s in ((T, Hq, D), (Hkv, S, D), (Hkv, S, D)))
    ref = _ref(q, k, v, kpos, qpos, 0.2, window)
    k[:, :16] = float("nan")
    v[:, :16] = float("nan")
    dev = [a.to(device) for a in (q, k, v, kpos, qpos)]
    y = attention(*dev, 0.2, window, block_s=16)
    assert _rel_err(y.cpu(), ref) < ATTN_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_attention_gqa_group_of_3_and_dv(device):
    """Non-pow2 group (Hq=6, Hkv=2), D=24 (padded), Dv=16, default scale, fp16 q with fp32 K/V."""
    g = torch.Generator().manual_seed(5)
    T, S, Hq, Hkv, D, Dv = 3, 21, 6, 2, 24, 16
    kpos = _kv_layout(S, S - 2, True, g)
    qpos = torch.arange(S - 2 - T, S - 2)
    q = torch.randn(T, Hq, D, generator=g).half()
    k = torch.randn(Hkv, S, D, generator=g)
    v = torch.randn(Hkv, S, Dv, generator=g)
    ref = _ref(q, k, v, kpos, qpos, D**-0.5, None)
    dev = [a.to(device) for a in (q, k, v, kpos, qpos)]
    y = attention(*dev)
    assert y.shape == (T, Hq * Dv) and y.dtype == torch.float16
    assert _rel_err(y.cpu(), ref) < ATTN_TOL[torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k_type,v_type,qdtype,window",
    [("q8_0", "q8_0", torch.float32, None), ("q4_0", "q4_0", torch.float16, 6),
     ("q8_0", "f16", torch.float16, None), ("f32", "q4_0", torch.float32, 9)],
)  # fmt: skip
def test_attention_dequantizes_q8_0_q4_0_kv_in_kernel(k_type, v_type, qdtype, window, device):
    """K/V as the cache stores them (uint8 ggml block rows): the kernel must equal attention over
    the dequantized cache. Irregular: Hq=6 / Hkv=2 (group of 3), D=64 (two blocks), S=37."""
    g = torch.Generator().manual_seed(_seed("qkv", k_type, v_type, window))
    T, S, Hq, Hkv, D = 3, 37, 6, 2, 64
    kpos = _kv_layout(S, S - 4, True, g)
    qpos = torch.arange(S - 4 - T, S - 4)
    q = torch.randn(T, Hq, D, generator=g).to(qdtype)
    k, v = torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g)

    def stored(x, kind):  # (what the kernel reads, the values the reference sees)
        if kind in ("f16", "f32"):
            dt = torch.float16 if kind == "f16" else torch.float32
            return x.to(dt), x.to(dt).float(), None
        qt = QT.Q8_0 if kind == "q8_0" else QT.Q4_0
        raw = quantize(x, qt)  # [Hkv, S, bytes]
        return raw, dequantize(raw, qt), kind

    kk, k_ref, kt = stored(k, k_type)
    vv, v_ref, vt = stored(v, v_type)
    ref = _ref(q, k_ref, v_ref, kpos, qpos, 0.13, window)
    dev = [a.to(device) for a in (q, kk, vv, kpos, qpos)]
    y = attention(*dev, 0.13, window, k_type=kt, v_type=vt)
    assert y.shape == (T, Hq * D) and y.dtype == qdtype
    assert _rel_err(y.cpu(), ref) < ATTN_TOL[qdtype]
    with pytest.raises(LlmkitError, match="block"):  # a float tensor declared as blocks
        attention(*dev[:1], k.to(device), *dev[2:], k_type="q8_0")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_type,window", [(None, None), ("q8_0", 7), ("q4_0", None)])
def test_attention_paged_block_table_equals_contiguous(kv_type, window, device):
    """The same slots scattered over shuffled pages of a larger pool (block table, page 8, last
    page partly used) give exactly the contiguous result."""
    g = torch.Generator().manual_seed(_seed("paged", kv_type, window))
    T, S, Hq, Hkv, D, page = 2, 29, 4, 2, 32, 8
    kpos = _kv_layout(S, S - 2, True, g)
    qpos = torch.arange(S - 2 - T, S - 2)
    q = torch.randn(T, Hq, D, generator=g)
    k, v = torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g)
    if kv_type:
        qt = QT.Q8_0 if kv_type == "q8_0" else QT.Q4_0
        k, v = quantize(k, qt), quantize(v, qt)
    n_pages = -(-S // page)
    bt = torch.randperm(n_pages + 3, generator=g)[:n_pages]  # 3 spare pages in the pool
    pool_k = torch.zeros(Hkv, (n_pages + 3) * page, k.shape[2], dtype=k.dtype)
    pool_v = torch.zeros_like(pool_k)
    rows = bt[torch.arange(S) // page] * page + torch.arange(S) % page
    pool_k[:, rows], pool_v[:, rows] = k, v
    dev = [a.to(device) for a in (q, k, v, kpos, qpos)]
    want = attention(*dev, 0.2, window, k_type=kv_type, v_type=kv_type)
    got = attention(
        q.to(device), pool_k.to(device), pool_v.to(device), kpos.to(device), qpos.to(device),
        0.2, window, k_type=kv_type, v_type=kv_type, block_table=bt.int().to(device), page=page,
        n_slots=S,
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if device != "cpu":  # bounds are only checked on CPU (a GPU check would sync every call)
        return
    with pytest.raises(LlmkitError, match="pool"):
        attention(
            *dev[:1], pool_k.to(device), pool_v.to(device), *dev[3:], k_type=kv_type,
            v_type=kv_type, block_table=(bt + 9).to(device), page=page, n_slots=S,
        )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "T,S,window,n_split,kv_type",
    [(1, 150, None, 3, None), (2, 150, 40, 4, None), (1, 133, None, 5, "q8_0"),
     (3, 64, 5, 2, None), (1, 20, None, 7, None)],
)  # fmt: skip
def test_attention_split_kv_equals_one_pass(T, S, window, n_split, kv_type, device):
    """Split-KV (slots divided among programs, merged by softmax statistics) equals the one-pass
    kernel and the reference; splits that see no key (sliding window) weigh nothing."""
    g = torch.Generator().manual_seed(_seed("split", T, S, window, n_split, kv_type))
    Hq, Hkv, D = 6, 2, 32
    kpos = _kv_layout(S, S - 5, True, g)
    qpos = torch.arange(S - 5 - T, S - 5)
    q = torch.randn(T, Hq, D, generator=g)
    k, v = torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g)
    ref_k, ref_v = k, v
    if kv_type:
        k, v = quantize(k, QT.Q8_0), quantize(v, QT.Q8_0)
        ref_k, ref_v = dequantize(k, QT.Q8_0), dequantize(v, QT.Q8_0)
    ref = _ref(q, ref_k, ref_v, kpos, qpos, 0.3, window)
    dev = [a.to(device) for a in (q, k, v, kpos, qpos)]
    one = attention(*dev, 0.3, window, k_type=kv_type, v_type=kv_type, n_split=1, block_s=16)
    many = attention(*dev, 0.3, window, k_type=kv_type, v_type=kv_type, n_split=n_split, block_s=16)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    assert _rel_err(many.cpu(), ref) < ATTN_TOL[torch.float32]


def test_attention_rejects_bad_input():
    q, k = torch.randn(1, 4, 32), torch.randn(3, 8, 32)
    with pytest.raises(LlmkitError, match="multiple"):
        attention(q, k, k, torch.arange(8), torch.tensor([7]))
    k = torch.randn(2, 8, 32)
    with pytest.raises(LlmkitError, match="kpos"):
        attention(q, k, k, torch.arange(9), torch.tensor([7]))
    with pytest.raises(LlmkitError, match="fp32/fp16/bf16"):
        attention(q.double(), k, k, torch.arange(8), torch.tensor([7]))


# ---------------------------------------------------------------------------------------------
# fusions (kernels/triton_fused.py)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,M", [(576, 1), (100, 3), (640, 5)])
def test_fused_rms_norm_with_and_without_residual(n, M, device, monkeypatch):
    import torch.nn.functional as F

    from llmkit.kernels.triton_fused import rms_norm

    g = torch.Generator().manual_seed(_seed("rms", n, M))
    x, r = torch.randn(M, n, generator=g).to(device), torch.randn(M, n, generator=g).to(device)
    w = torch.rand(n, generator=g).to(device) + 0.5
    _poison(monkeypatch)
    y = rms_norm(x, w, 1e-6)
    assert _rel_err(y, F.rms_norm(x, (n,), w, 1e-6)) < 1e-5
    s, y2 = rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(s, x + r)
    assert _rel_err(y2, F.rms_norm(x + r, (n,), w, 1e-5)) < 1e-5
    assert _rel_err(rms_norm(x, None, 1e-5), F.rms_norm(x, (n,), None, 1e-5)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("f,M", [(96, 1), (1536, 2), (37, 4)])
def test_fused_glu_matches_torch(act, f, M, device, monkeypatch):
    import torch.nn.functional as F

    from llmkit.kernels.triton_fused import glu

    g = torch.Generator().manual_seed(_seed("glu", act, f, M))
    gu = (torch.randn(M, 2 * f, generator=g) * 3).to(device)
    gate, up = gu.chunk(2, dim=-1)
    ref = (F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up
    _poison(monkeypatch)
    assert _rel_err(glu(gu, act), ref) < 1e-5
    with pytest.raises(LlmkitError, match="relu"):
        glu(gu, "relu")


# ---------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [ROPE_NORM, ROPE_NEOX])
@pytest.mark.parametrize("T,H,D,n_rot", [(3, 5, 64, 64), (1, 7, 48, 32), (6, 3, 80, 80)])
def test_rope_matches_torch(mode, T, H, D, n_rot, device, monkeypatch):
    """Both modes, partial rotation (tail copied), and x a strided view of a wider qkv row, as
    the llama model passes it."""
    g = torch.Generator().manual_seed(_seed(mode, T, H, D, n_rot))
    qkv = torch.randn(T, H * D + 24, generator=g)
    x = qkv[:, : H * D].view(T, H, D)  # row stride H * D + 24
    pos = torch.randint(0, 5000, (T,), generator=g)
    cos, sin = rope_cache(pos, n_rot, 10000.0)
    ref = apply_rope(x, cos, sin, mode)  # CPU tensors: the torch path
    _poison(monkeypatch)
    out = rope(x.to(device), cos.to(device), sin.to(device), mode).cpu()
    assert out.shape == (T, H, D)
    assert _rel_err(out, ref) < 1e-6
