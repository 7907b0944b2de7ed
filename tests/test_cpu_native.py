"""Native CPU matmul on GGUF bytes (kernels/cpu_native.py): exact against a float64 reference
that quantizes the activations the way llama.cpp does, batch- and thread-invariant bit for bit,
on every path this CPU supports (the portable scalar one included)."""

import functools

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native as cn
from llmkit.kernels import native_abi
from llmkit.quant.dequant import dequantize
from llmkit.quant.quantize import quantize

pytestmark = pytest.mark.skipif(
    not cn.available(), reason=f"no native lib: {cn.unavailable_reason()}"
)

TYPES = sorted(cn.SUPPORTED_TYPES, key=int)
FLOATS = {QT.F32, QT.F16, QT.BF16}
Q8_1_TYPES = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.IQ4_NL}
MIN_TYPES = {QT.Q4_1, QT.Q5_1}
PATHS = cn.supported_isas() if cn.available() else []  # scalar and every SIMD path of this CPU


@pytest.fixture(autouse=True)
def _restore():
    threads = cn.get_threads() if cn.available() else 0
    yield
    if cn.available():
        cn.set_isa("best")
        cn.set_threads(threads)


@functools.cache  # read-only in every test: quantize each (type, shape) once
def _weights(qtype, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::7] *= 4  # some structure in the block maxima
    if qtype == QT.F32:
        return w.view(torch.uint8).reshape(n, 4 * k)
    return quantize(w, qtype)


def _x(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


# ---- numpy reference of the activation formats (ggml's reference quantizers) ----


def _roundf(v):  # ties away from zero, exactly
    t = np.trunc(v)
    f = v - t
    return t + (f >= 0.5) - (f <= -0.5)


def ref_q8_1(x):
    """[K] fp32 -> q int [K/32, 32], d fp32 (fp16-rounded) [K/32], s (fp16-rounded) [K/32]."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    d = np.abs(b).max(1) / np.float32(127)
    idv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = _roundf(b * idv[:, None]).astype(np.int32)
    s = (q.sum(1).astype(np.float32) * d).astype(np.float16).astype(np.float32)
    return q, d.astype(np.float16).astype(np.float32), s


def ref_q8_k(x):
    """[K] fp32 -> q int [K/256, 256], d fp32 [K/256], bsums [K/16]."""
    b = np.asarray(x, np.float32).reshape(-1, 256)
    mx = b[np.arange(len(b)), np.abs(b).argmax(1)]  # the first value of largest magnitude
    iscale = np.float32(-127) / np.where(mx != 0, mx, 1)
    q = np.minimum(127, np.rint(b * iscale[:, None])).astype(np.int32)
    d = np.float32(1) / iscale
    q[mx == 0], d[mx == 0] = 0, 0
    return q, d, q.reshape(-1, 16).sum(1)


def reference(x, wb, qtype, n, k):
    """(exact, scale): float64 x @ W^T with x rounded to the weight's activation format, and
    |x| @ |W|^T (the size of the fp32 summation error)."""
    wd = dequantize(wb, qtype, (n, k)).double()
    xf = x.numpy()
    corr = torch.zeros(x.shape[0], n, dtype=torch.float64)
    if qtype == QT.F16:
        xq = x.half().double()
    elif qtype == QT.BF16:
        xq = x.bfloat16().double()
    elif qtype == QT.F32:
        xq = x.double()
    elif qtype in Q8_1_TYPES:
        rows = [ref_q8_1(r) for r in xf]
        xq = torch.tensor(
            np.stack([(q * d[:, None]).ravel() for q, d, _ in rows]), dtype=torch.float64
        )
        if (
            qtype in MIN_TYPES
        ):  # the min term uses s (fp16) where the dequantized product has d*sum(q)
            ts = GGML_QUANT_SIZES[qtype][1]
            m = wb.reshape(n, -1, ts)[:, :, 2:4].contiguous().view(torch.float16).double()[..., 0]
            ds = torch.tensor(np.stack([s - d * q.sum(1) for q, d, s in rows]), dtype=torch.float64)
            corr = ds @ m.T
    else:
        rows = [ref_q8_k(r) for r in xf]
        xq = torch.tensor(
            np.stack([(q * d[:, None]).ravel() for q, d, _ in rows]), dtype=torch.float64
        )
    return xq @ wd.T + corr, xq.abs() @ wd.abs().T + corr.abs()


def _shapes(qtype):
    if qtype in FLOATS:
        return [(7, 1), (33, 100), (20, 545)]
    if GGML_QUANT_SIZES[qtype][0] == 32:
        return [(7, 96), (33, 160), (20, 544)]
    return [(7, 256), (33, 512)]


# ---- tests ----


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_exact_against_float64_reference(qtype, path):
    with cn.use_isa(path):
        for n, k in _shapes(qtype):
            wb = _weights(qtype, n, k)
            x = _x(17, k)
            x[3] = 0  # all-zero row: zero scales
            y = cn.matmul(x, wb, qtype).double()
            ref, scale = reference(x, wb, qtype, n, k)
            err = ((y - ref).abs() / (scale + 1e-30)).max().item()
            assert err <= 1e-5, f"{qtype.name} {n}x{k} on {path}: relative error {err:.2e}"
            # against unquantized activations: the activation format's rounding bound
            true = x.double() @ dequantize(wb, qtype, (n, k)).double().T
            norm = x.double().norm(dim=1, keepdim=True) * dequantize(
                wb, qtype, (n, k)
            ).double().norm(dim=1)
            tol = {QT.F32: 1e-5, QT.F16: 1e-3, QT.BF16: 5e-3}.get(
                qtype, 0.03 if qtype in Q8_1_TYPES else 0.065
            )
            assert ((y - true).abs() <= tol * norm + 1e-6).all(), f"{qtype.name} {n}x{k} on {path}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_batch_and_thread_invariant_bit_for_bit(qtype, path):
    block = GGML_QUANT_SIZES[qtype][0]
    n, k = (257, 512) if block == 256 else (257, 160)
    wb = _weights(qtype, n, k, seed=2)
    x = _x(40, k, seed=3)
    with cn.use_isa(path):
        cn.set_threads(1)
        single = torch.cat([cn.matmul(x[i : i + 1], wb, qtype) for i in range(40)])
        for threads in (1, 2):
            cn.set_threads(threads)
            for m in [*range(1, 18), 40]:
                y = cn.matmul(x[:m], wb, qtype)
                assert torch.equal(y, single[:m]), f"{qtype.name} M={m} threads={threads} on {path}"
            # a row inside another batch (other rows around it, at another position)
            perm = torch.randperm(40, generator=torch.Generator().manual_seed(threads))[:13]
            assert torch.equal(cn.matmul(x[perm], wb, qtype), single[perm])


def test_fused_parts_split_and_stolen_between_threads_bit_for_bit():
    """Output groups of 8 rows cut into one range per thread and stolen from the back
    (matmul.c, llk_ranges): parts whose row counts are not multiples of 8, mixed types, and
    more threads than CPUs (descheduled workers: the others take their ranges) compute every
    element once, exactly as one thread does."""
    k = 512
    parts = [(_weights(QT.Q4_K, 13, k, seed=7), QT.Q4_K, (13, k)),
             (_weights(QT.Q8_0, 29, k, seed=8), QT.Q8_0, (29, k)),
             (_weights(QT.Q6_K, 3, k, seed=9), QT.Q6_K, (3, k)),
             (_weights(QT.Q4_1, 70, k, seed=10), QT.Q4_1, (70, k))]  # fmt: skip
    lin = cn.NativeLinear(parts)
    x = _x(17, k, seed=11)
    cn.set_threads(1)
    want = lin(x)
    for threads in (2, 3, 5):
        cn.set_threads(threads)
        for m in (1, 2, 5, 17):
            for _ in range(20):  # schedules differ from call to call
                assert torch.equal(lin(x[:m]), want[:m]), f"threads={threads} M={m}"


@pytest.mark.skipif(cn.isa() == "scalar" if cn.available() else True, reason="no SIMD path")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_simd_close_to_scalar(qtype):
    n, k = (33, 512) if GGML_QUANT_SIZES[qtype][0] == 256 else (33, 544)
    wb, x = _weights(qtype, n, k, seed=4), _x(9, k, seed=5)
    fast = cn.matmul(x, wb, qtype).double()
    with cn.use_isa("scalar"):
        slow = cn.matmul(x, wb, qtype).double()
    _, scale = reference(x, wb, qtype, n, k)
    assert ((fast - slow).abs() <= 2e-5 * scale + 1e-30).all()


def test_x86_paths_agree_bit_for_bit():
    have = [p for p in ("avx2", "avx512_vnni") if p in cn.supported_isas()]
    if len(have) < 2:
        pytest.skip("needs both x86 SIMD paths")
    for qtype in TYPES:
        k = 512 if GGML_QUANT_SIZES[qtype][0] == 256 else 544
        wb, x = _weights(qtype, 20, k, seed=6), _x(11, k, seed=7)
        ys = []
        for p in have:
            with cn.use_isa(p):
                ys.append(cn.matmul(x, wb, qtype))
        assert torch.equal(ys[0], ys[1]), qtype.name


@pytest.mark.parametrize("path", PATHS)
def test_activation_quantizers_match_ggml_reference_exactly(path):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1024, generator=g) * 3
    x[:32] = torch.arange(32) - 15.5
    x[32:64] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5] + [0.0] * 26)  # d = 1: ties
    x[64:96] = 0  # zero block
    x[256:512] = 0
    x[256 + 5], x[256 + 9] = 5.0, -5.0  # q8_K: first of the two maxima (positive) sets the sign
    x[512:768] = torch.tensor([-127.0, 2.5, 3.5, -2.5] + [0.25] * 252)  # iscale = 1: ties to even
    with cn.use_isa(path):
        qs, d, s, isum = cn._quantize_rows(x, "q8_1")
        rq, rd, rs = ref_q8_1(x.numpy())
        assert np.array_equal(qs.numpy().reshape(-1, 32), rq)
        assert np.array_equal(isum.numpy(), rq.sum(1))
        assert np.array_equal(d.numpy(), rd) and np.array_equal(s.numpy(), rs)
        assert qs[33:38].tolist() == [3, -3, 1, -1, 2]  # roundf: ties away from zero
        qs, d, bs = cn._quantize_rows(x, "q8_K")
        rq, rd, rb = ref_q8_k(x.numpy())
        assert np.array_equal(qs.numpy().reshape(-1, 256), rq)
        assert np.array_equal(d.numpy(), rd) and np.array_equal(bs.numpy(), rb)
        assert qs[256 + 5] == -127 and qs[513:516].tolist() == [2, 4, -2]  # rint: ties to even


def test_fused_parts_of_mixed_types_write_their_columns():
    k = 512
    parts = [(_weights(t, n, k, seed=i), t, (n, k)) for i, (t, n) in enumerate(
        [(QT.Q5_0, 33), (QT.Q8_0, 7), (QT.Q4_K, 20), (QT.F16, 5)]
    )]  # fmt: skip
    lin = cn.NativeLinear(parts)
    assert (lin.in_features, lin.out_features) == (k, 65)
    x = _x(6, k, seed=9)
    y = lin(x.view(2, 3, k))
    assert y.shape == (2, 3, 65)
    expect = torch.cat([cn.matmul(x, wb, t) for wb, t, _ in parts], dim=1)
    assert torch.equal(y.view(6, 65), expect)


def test_weight_views_and_out_buffer():
    k, qtype = 160, QT.Q4_1
    big = _weights(qtype, 50, k + 32, seed=10)  # rows of 6 blocks: use the first 5
    rows = big[10:40, : 5 * 20]  # a row slice with row stride > row bytes
    x = _x(3, k, seed=11)
    expect = cn.matmul(x, rows.contiguous(), qtype)
    out = torch.full((3, 40), 7.0)
    got = cn.matmul(x, rows, qtype, out=out[:, 5:35])
    assert got.data_ptr() == out[:, 5:35].data_ptr() and torch.equal(got, expect)
    assert (out[:, :5] == 7).all() and (out[:, 35:] == 7).all()


def test_errors_name_the_problem():
    wb = _weights(QT.Q4_0, 4, 64)
    for bad in (QT.Q8_1, QT.IQ2_XXS):
        with pytest.raises(LlmkitError, match=bad.name):
            cn.matmul(_x(1, 64), wb, bad)
    with pytest.raises(LlmkitError, match="multiple of its 256"):
        cn.NativeLinear([(torch.zeros(4, 144 * 2, dtype=torch.uint8), QT.Q4_K, (4, 640))])
    with pytest.raises(LlmkitError, match="hold 64 values"):
        cn.matmul(_x(1, 96), wb, QT.Q4_0)


def test_missing_library_is_reported_not_raised(monkeypatch):
    import llmkit.native_lib as nl

    monkeypatch.setattr(nl, "library_path", lambda: None)
    nl.load_library.cache_clear()
    try:
        lib, reason = native_abi.load()
    finally:
        nl.load_library.cache_clear()
    assert lib is None and "not built" in reason


def test_concurrent_python_threads_get_correct_results():
    import threading

    wb, x = _weights(QT.Q4_K, 64, 512, seed=12), _x(5, 512, seed=13)
    expect = cn.matmul(x, wb, QT.Q4_K)
    results, errors = [], []

    def work():
        try:
            results.extend(torch.equal(cn.matmul(x, wb, QT.Q4_K), expect) for _ in range(50))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 150 and all(results)
