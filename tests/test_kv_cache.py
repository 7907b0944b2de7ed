"""KV cache: slot geometry, masks from positions, sliding rings that wrap, rollback."""

from pathlib import Path

import pytest
import torch

from llmkit.core.cache.kv import KVCache, LayerKV
from llmkit.errors import LlmkitError


def _cache(window=4, margin=3, n_ctx=32):
    layers = {0: LayerKV(1, 2, 2), 1: LayerKV(1, 2, 2, window=window)}
    return KVCache(layers, n_ctx, margin, attn_kernel="torch")  # the masks it builds are checked


def _step(c, n):
    pos = torch.arange(c.n_past, c.n_past + n)
    c.begin(pos)
    kv = pos.float()[:, None, None].expand(n, 1, 2)  # store the position as the key value
    return pos, c.update(0, kv, kv), c.update(1, kv, kv)


def test_full_layer_sees_all_past_positions():
    c = _cache()
    _step(c, 4)
    pos, (K, V, mask), _ = _step(c, 2)
    assert K.shape[1] == 6 and mask.shape == (2, 6)
    assert mask[0].tolist() == [True] * 5 + [False]
    assert mask[1].all()


def test_sliding_ring_wraps_and_masks_by_window():
    c = _cache(window=4, margin=3)  # ring of 7 slots
    for _ in range(12):
        pos, _, (K, V, mask) = _step(c, 1)
    assert K.shape[1] == 7
    visible = sorted(K[0, mask[0], 0].tolist())
    assert visible == [8.0, 9.0, 10.0, 11.0]  # the current token and the 3 before it


def test_batch_wider_than_ring_margin_is_rejected():
    c = _cache(window=4, margin=3)
    with pytest.raises(LlmkitError, match="does not fit the sliding-window ring"):
        _step(c, 5)


def test_truncate_rolls_back_both_layer_kinds():
    c = _cache(window=4, margin=3)
    for _ in range(10):
        _step(c, 1)
    c.truncate(8)  # drop positions 8, 9
    assert c.n_past == 8
    pos, (K, _, m_full), (Ks, _, m_swa) = _step(c, 1)
    assert pos.tolist() == [8]
    assert sorted(Ks[0, m_swa[0], 0].tolist()) == [5.0, 6.0, 7.0, 8.0]
    assert K[0, m_full[0], 0].tolist() == [float(i) for i in range(9)]


def test_truncate_beyond_ring_margin_is_an_error():
    c = _cache(window=4, margin=3)
    for _ in range(12):
        _step(c, 1)
    with pytest.raises(LlmkitError, match="cannot roll back"):
        c.truncate(5)


@pytest.mark.parametrize("seed", range(6))
def test_rollbacks_forget_exactly_what_a_scan_of_the_slots_forgets(seed):
    """Random batches (wrapping the ring), rollbacks and draft trees: each group's slot positions
    equal a reference that writes slot = position mod capacity and forgets by scanning the slots,
    and a rollback fails exactly when a position inside the window was overwritten."""
    rng = torch.Generator().manual_seed(seed)
    c = _cache(window=4, margin=3, n_ctx=40)  # ring of 7 slots
    ref = {g.name: [-1] * g.capacity for g in c.groups.values()}

    def rand(n):
        return int(torch.randint(n, (), generator=rng))

    for _ in range(60):
        op = rand(4)
        if op < 2 and c.n_past < c.n_ctx:  # a batch of 1..4 rows
            n = 1 + rand(min(4, c.n_ctx - c.n_past))
            p0 = c.n_past
            _step(c, n)
            for g in c.groups.values():
                for q in range(p0, p0 + n):
                    ref[g.name][q % g.capacity] = q
        elif op == 2 and c.n_past:  # roll back 1..6 positions
            p = max(0, c.n_past - 1 - rand(6))
            fails = []
            for g in c.groups.values():
                keep = [q if q < p else -1 for q in ref[g.name]]
                need = min(p, g.window or 0)
                if sum(p - need <= q < p for q in keep) != need:
                    fails.append(g.name)
                ref[g.name] = keep
            if fails:
                with pytest.raises(LlmkitError, match="cannot roll back"):
                    c.truncate(p)
                return  # the cache is left unusable after a failed rollback
            c.truncate(p)
        elif op == 3 and c.n_past + 3 <= c.n_ctx:  # a draft tree; keep the root and a child
            p0 = c.n_past
            _tree_step(c, [-1, 0, 0], [p0, p0 + 1, 50])
            child = 1 + rand(2)
            c.commit_path(p0, [0, child])
            for g in c.groups.values():  # three slots written, the third one freed again
                for q in (p0, p0 + 1, p0 + 2):
                    ref[g.name][q % g.capacity] = q if q < p0 + 2 else -1
        for g in c.groups.values():
            assert g.slot_pos.tolist() == ref[g.name], (g.name, c.n_past)


def test_positions_must_continue_and_fit():
    c = _cache(n_ctx=6)
    _step(c, 3)
    with pytest.raises(LlmkitError, match="expects positions 3"):
        c.begin(torch.tensor([5]))
    with pytest.raises(LlmkitError, match="context is full"):
        _step(c, 4)


def test_plan_reports_bytes_per_group():
    c = _cache(window=4, margin=3, n_ctx=32)
    plan = c.plan()
    assert plan["groups"]["full"]["cells"] == 32 and plan["groups"]["swa4"]["cells"] == 7
    assert plan["bytes"] == (32 + 7) * 2 * 2 * 2  # cells x (K+V) x head_dim x f16
    with pytest.raises(LlmkitError, match="unsupported K cache type q3"):
        KVCache({0: LayerKV(1, 2, 2)}, 8, type_k="q3")


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_cache_round_trips_with_ggml_error(kind):
    from gguf import quants as gq

    from llmkit.core.cache.kv import KV_TYPES

    c = KVCache({0: LayerKV(2, 64, 64)}, 16, 4, type_k=kind, type_v=kind)
    k = torch.randn(3, 2, 64)
    c.begin(torch.arange(3))
    K, V, _ = c.update(0, k, -k)
    ref = gq.dequantize(gq.quantize(k.transpose(0, 1).numpy(), KV_TYPES[kind]), KV_TYPES[kind])
    assert torch.equal(K, torch.from_numpy(ref)) and torch.equal(V, -K)
    assert c.nbytes() == 2 * 2 * 16 * (64 // 32) * (34 if kind == "q8_0" else 18)
    with pytest.raises(LlmkitError, match="multiple of 32"):
        KVCache({0: LayerKV(1, 40, 40)}, 8, type_k=kind)


def _tree_step(c, parents, values):
    """A draft-tree batch storing `values` (one per row) as keys; returns positions and masks."""
    with c.tree_batch(parents):
        pos = c.positions(len(parents))
        c.begin(pos)
        kv = torch.tensor(values, dtype=torch.float32)[:, None, None].expand(-1, 1, 2)
        return pos, c.update(0, kv, kv), c.update(1, kv, kv)


def test_draft_tree_rows_see_only_their_ancestors():
    c = _cache(window=4, margin=4)  # ring of 8 slots: 5 tree rows + the 3 before
    for _ in range(9):
        _step(c, 1)
    # rows: 0 root, 1 chain child, 2 grandchild, 3 and 4 siblings of row 1
    pos, (K, _, m_full), (Ks, _, m_swa) = _tree_step(c, [-1, 0, 1, 0, 0], [9, 10, 11, 20, 21])
    assert pos.tolist() == [9, 10, 11, 10, 10]
    assert K[0, m_full[3], 0].tolist() == [float(i) for i in range(10)] + [20.0]
    assert sorted(Ks[0, m_swa[2], 0].tolist()) == [8.0, 9.0, 10.0, 11.0]  # window 4
    assert sorted(Ks[0, m_swa[4], 0].tolist()) == [7.0, 8.0, 9.0, 21.0]  # not its siblings


@pytest.mark.parametrize("path", [[0], [0, 1, 2], [0, 3], [0, 4]])
def test_commit_path_compacts_the_accepted_rows(path):
    c = _cache(window=4, margin=4)
    for _ in range(9):
        _step(c, 1)
    values = [9, 10, 11, 20, 21]
    _tree_step(c, [-1, 0, 1, 0, 0], values)
    c.commit_path(9, path)
    assert c.n_past == 9 + len(path)
    pos, (K, _, m_full), (Ks, _, m_swa) = _step(c, 1)  # the next token sees the kept path only
    kept = [float(values[r]) for r in path]
    assert K[0, m_full[0], 0].tolist() == [float(i) for i in range(9)] + kept + [float(pos[0])]
    want = ([float(i) for i in range(9)] + kept + [float(pos[0])])[-4:]
    assert sorted(Ks[0, m_swa[0], 0].tolist()) == sorted(want)


def test_draft_tree_must_be_a_tree():
    c = _cache()
    _step(c, 2)
    for bad in ([0, 0], [-1, 1], [-1, 0, 3]):
        with pytest.raises(LlmkitError, match="not a draft tree"):
            with c.tree_batch(bad):
                pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_cpu_buffers_take_memory_only_for_written_slots():
    """A CPU KV buffer reads as zeros and costs resident memory only where slots were written
    (a long -c with a short conversation), not its whole size as a memset would."""
    from llmkit.core.cache.store import alloc

    before = _rss_bytes()
    buf = alloc("f16", 4, 131072, 128, "cpu")  # 128 MiB
    # reading never-written pages maps no memory either (in pieces: no whole-buffer temporary)
    assert not any(bool(buf[:, i : i + 4096].any()) for i in range(0, 131072, 4096))
    buf[:, :100] = 1.0
    grown = _rss_bytes() - before
    assert grown < 16 * 2**20, grown  # 4 heads' first pages (2 MiB each with huge pages)
    assert int((buf[:, :200] != 0).sum()) == 4 * 100 * 128
