"""x8 groups (kernels/cpu_pack.py, kernels/native/pack.c): the weight layout the x86 group kernels
(32-value types and Q4_K / Q5_K / Q6_K) read without a transposition. The same bytes moved: every result equals the GGUF rows' bit for
bit, on every path (a path without an x8 kernel unpacks each group first); a matrix packed from
a file mapping leaves none of that mapping's pages in the process; bad layouts are refused."""

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from smaps import mapped_rss_kib

from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError
from llmkit.kernels import cpu_native as cn
from llmkit.kernels import cpu_pack, native_abi
from llmkit.quant.quantize import quantize
from tiny_models import write_tiny_gemma3, write_tiny_llama

pytestmark = pytest.mark.skipif(
    not cn.available(), reason=f"no native lib: {cn.unavailable_reason()}"
)
X8 = sorted(cpu_pack.X8_TYPES, key=int)
PATHS = cn.supported_isas() if cn.available() else []


@pytest.fixture(autouse=True)
def _restore():
    yield
    cn.set_isa("best")


def _w(qtype, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::5] *= 3
    return quantize(w, qtype)


def _pair(parts):
    """The same parts as x8 groups (where the path packs them) and as GGUF rows."""
    return cn.NativeLinear(parts, pack=True), cn.NativeLinear(parts, pack=False)


@pytest.mark.parametrize("qtype", X8, ids=lambda t: t.name)
def test_x8_groups_give_the_rows_results_bit_for_bit(qtype):
    """Every M (tiles of 1-16 rows and the multi-tile walk past 16), tails of 1-7 rows, on
    every path of this CPU: the packed linear equals the rows' bit for bit."""
    shapes = [(1, 32), (7, 96), (8, 64), (13, 640), (67, 160)]
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        shapes = [(1, 256), (7, 512), (8, 256), (13, 768), (67, 256)]
    for n, k in shapes:
        packed, rows = _pair([(_w(qtype, n, k), qtype, (n, k))])
        assert rows._parts[0].layout == cpu_pack.LAYOUT_ROWS
        native = bool(cn.library().llk_x8_native(int(qtype)))
        want = cpu_pack.LAYOUT_X8 if native else cpu_pack.LAYOUT_ROWS
        assert packed._parts[0].layout == want
        for m in (1, 2, 3, 4, 5, 8, 16, 17, 40):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            for isa in PATHS:
                cn.set_isa(isa)
                assert torch.equal(packed(x), rows(x)), (qtype.name, n, k, m, isa)


def test_fused_parts_mix_layouts():
    """q|k|v-style fusions of packable and other types: each part in its own layout, one call."""
    k = 256
    parts = [(_w(QT.Q5_0, 21, k, 1), QT.Q5_0, (21, k)), (_w(QT.Q3_K, 9, k, 2), QT.Q3_K, (9, k)),
             (_w(QT.Q8_0, 16, k, 3), QT.Q8_0, (16, k)), (_w(QT.Q4_1, 3, k, 4), QT.Q4_1, (3, k))]  # fmt: skip
    packed, rows = _pair(parts)
    if cn.library().llk_x8_native(int(QT.Q5_0)):
        layouts = [p.layout for p in packed._parts]
        assert layouts == [cpu_pack.LAYOUT_X8, cpu_pack.LAYOUT_ROWS] + [cpu_pack.LAYOUT_X8] * 2
    for m in (1, 3, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        for isa in PATHS:
            cn.set_isa(isa)
            assert torch.equal(packed(x), rows(x)), (m, isa)


@pytest.mark.skipif(not cn.available() or not cn.library().llk_x8_native(int(QT.Q8_0)),
                    reason="this ISA path keeps GGUF rows")  # fmt: skip
def test_packing_a_mapped_matrix_drops_the_mappings_pages(tmp_path):
    """Packed from a read-only file mapping with release: the results are the rows', the
    mapping holds (nearly) no resident page afterwards, and its bytes still read back intact;
    without release the pages stay."""
    n, k = 1024, 1024  # 1.06 MiB of Q8_0
    w = _w(QT.Q8_0, n, k)
    path = tmp_path / "w.bin"
    path.write_bytes(w.numpy().tobytes())
    ref = cn.NativeLinear([(w, QT.Q8_0, (n, k))], pack=False)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    for release in (True, False):
        mm = np.memmap(path, dtype=np.uint8, mode="c", shape=w.shape)
        src = torch.from_numpy(mm)
        src.sum()  # every page resident
        assert mapped_rss_kib(path) >= w.numel() // 1024
        lin = cn.NativeLinear([(src, QT.Q8_0, (n, k))], release=release)
        rss = mapped_rss_kib(path)
        if release:
            assert rss <= 8, rss  # at most the pages shared with the ends of the matrix
        else:
            assert rss >= w.numel() // 1024
        assert torch.equal(lin(x), ref(x))
        assert torch.equal(src, w)  # the dropped pages read back from the file
        del lin, src, mm


def test_bad_layouts_and_packing_arguments_are_refused():
    lib = cn.library()
    k = 64
    w = _w(QT.Q3_K, 8, 256)  # read row-wise on every path: no x8 groups
    x = torch.randn(1, 256)
    y = torch.empty(1, 8)
    bad = native_abi.Part(w.data_ptr(), w.stride(0), 8, 0, int(QT.Q3_K), cpu_pack.LAYOUT_X8)
    assert lib.llk_matmul(x.data_ptr(), 1, 256, 256, ctypes.byref(bad), 1, y.data_ptr(), 8) == -1
    q = _w(QT.Q8_0, 8, k)
    for stride, layout in ((q.stride(0) + 2, cpu_pack.LAYOUT_X8), (q.stride(0), 7)):
        part = native_abi.Part(q.data_ptr(), stride, 8, 0, int(QT.Q8_0), layout)
        x = torch.randn(1, k)
        assert lib.llk_matmul(x.data_ptr(), 1, k, k, ctypes.byref(part), 1, y.data_ptr(), 8) == -2
    out = torch.empty(8, q.shape[1], dtype=torch.uint8)
    assert lib.llk_pack_x8(w.data_ptr(), w.stride(0), 8, 256, int(QT.Q3_K), out.data_ptr(), 0) == -1
    k4 = _w(QT.Q4_K, 8, 256)
    assert (
        lib.llk_pack_x8(k4.data_ptr(), k4.stride(0), 8, 128, int(QT.Q4_K), out.data_ptr(), 0) == -2
    )
    assert lib.llk_pack_x8(q.data_ptr(), q.stride(0), 8, 33, int(QT.Q8_0), out.data_ptr(), 0) == -2
    with pytest.raises(LlmkitError, match="K=64"):
        cn.NativeLinear([(q, QT.Q8_0, (8, 64)), (w, QT.Q3_K, (8, 256))])


@pytest.mark.parametrize("write", [write_tiny_llama, write_tiny_gemma3], ids=["llama", "gemma3"])
def test_a_loaded_model_computes_the_same_logits_packed(tmp_path, write):
    """A whole forward (decode steps and a verify-sized batch) on x8 groups equals the rows'
    bit for bit; the backend lists what it packed."""
    path = write(tmp_path / "m.gguf")
    tokens = torch.tensor([1, 17, 30, 5, 26, 44, 9, 27])
    out = {}
    for enabled in (True, False):
        lm = load_model(path, repack=enabled)
        assert bool(lm.backend.packed) == (
            enabled and bool(cn.library().llk_x8_native(int(QT.Q8_0)))
        )
        with torch.inference_mode():
            cache = lm.new_cache(64, margin=16)
            rows = [lm.model.forward(tokens[:5], cache, logits="all").logits]
            rows += [
                lm.model.forward(tokens[i : i + 1], cache, logits="all").logits for i in (5, 6)
            ]
            rows.append(lm.model.forward(tokens[6:8], cache, logits="all").logits)
        out[enabled] = rows
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a, b)


def test_no_repack_keeps_the_gguf_rows(tmp_path):
    """load_model(repack=False) (`llm run/serve --no-repack`): nothing moves into x8 groups."""
    path = write_tiny_llama(tmp_path / "m.gguf")
    lm = load_model(path, repack=False)
    assert not lm.backend.packed and not lm.backend.repack


def test_no_memory_for_the_copy_keeps_the_rows(monkeypatch):
    """When the x8 copy cannot be allocated, the linear reads the GGUF rows where they lie."""

    def no_room(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    w = _w(QT.Q8_0, 16, 64)
    ref = cn.NativeLinear([(w, QT.Q8_0, (16, 64))], pack=False)
    monkeypatch.setattr(cpu_pack, "zero_array", no_room)
    lin = cn.NativeLinear([(w, QT.Q8_0, (16, 64))], pack=True)
    assert lin._parts[0].layout == cpu_pack.LAYOUT_ROWS and not lin.packed
    x = torch.randn(2, 64)
    assert torch.equal(lin(x), ref(x))


def test_gather_rows_reads_a_mapping_window_by_window(tmp_path):
    """rows[ids] for unsorted ids, sparse and dense, equal to plain indexing; the mapping's pages
    are dropped after each window, so none stays resident."""
    n, rb = 4096, 680  # 2.7 MiB
    data = torch.randint(
        0, 256, (n, rb), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    path = tmp_path / "rows.bin"
    path.write_bytes(data.numpy().tobytes())
    rows = np.memmap(path, dtype=np.uint8, mode="c", shape=(n, rb))
    ids = torch.cat([torch.arange(0, 300), torch.randperm(n, generator=torch.Generator())[:500]])
    ids = torch.unique(ids)[torch.randperm(torch.unique(ids).numel())]  # unique, unsorted
    got = cpu_pack.gather_rows(cn.library(), rows, ids.numpy(), span=1 << 16)
    assert torch.equal(torch.from_numpy(got), data[ids])
    assert mapped_rss_kib(path) <= 64
