"""Paged KV pool: block accounting, reservations, prefix sharing with copy-on-write, sliding-window
blocks freed, and a batched multi-sequence forward that is bit-identical to lone runs."""

import pytest
import torch

from llmkit.core.cache.batch import BatchCache
from llmkit.core.cache.kv import LayerKV
from llmkit.core.cache.paged import PagedKV
from llmkit.core.models.loader import load_model
from llmkit.errors import LlmkitError
from tiny_models import write_tiny_gemma3, write_tiny_llama


def _pool(n_tokens=64, bs=4, window=None, **kw):
    layers = {0: LayerKV(1, 2, 2), 1: LayerKV(1, 2, 2, window=window)} if window else None
    return PagedKV(layers or {0: LayerKV(1, 2, 2)}, n_tokens, bs, **kw)


def _write(pool, seq, n):
    """One forward's worth of rows: store each position as its key value; return (K, mask) of
    layer 0 for the batch."""
    view = pool.prepare(seq, n)
    pos = torch.arange(seq.n_past - n, seq.n_past).float()
    kv = pos[:, None, None].expand(n, 1, 2)
    for il in pool.group_of:
        pool.write(il, view.write[pool.group_of[il].name], kv, kv)
    pool.publish(seq)
    K, _ = pool.read(0, view.read["full"])
    return K, view.mask["full"], view


def test_blocks_allocated_on_demand_and_all_returned():
    pool = _pool()
    seq = pool.admit(list(range(10)), n_tokens=20, n_ctx=32)
    assert pool.groups["full"].promised == 5  # ceil(20 / 4) blocks reserved, none used yet
    K, mask, _ = _write(pool, seq, 10)
    assert pool.groups["full"].used == 3
    K, mask, _ = _write(pool, seq, 1)
    visible = K[0, mask[0], 0].tolist()
    assert visible == [float(p) for p in range(11)]  # every past position, in order
    pool.release(seq)
    g = pool.groups["full"]
    assert g.used == 0 and g.promised == 0 and g.available == g.n_blocks
    assert pool.stats()["bytes_per_token"] == 2 * 2 * 2  # K and V, 1 head x 2 dims, f16


def test_requests_that_do_not_fit_are_deferred_not_crashed():
    pool = _pool(n_tokens=32, bs=4)  # 8 blocks
    a = pool.admit([1] * 8, n_tokens=24, n_ctx=64, share=False)  # reserves 6
    assert a is not None
    assert pool.admit([2] * 8, n_tokens=24, n_ctx=64, share=False) is None
    assert not pool.fits_ever(40) and pool.fits_ever(32)
    pool.release(a)
    assert pool.admit([2] * 8, n_tokens=24, n_ctx=64, share=False) is not None


def test_prefix_blocks_are_shared_with_refcounts():
    pool = _pool(n_tokens=64, bs=4)
    prompt = list(range(100, 112))  # 3 full blocks
    a = pool.admit(prompt + [7, 8], n_tokens=20, n_ctx=32)
    _write(pool, a, 14)
    b = pool.admit(prompt + [9], n_tokens=20, n_ctx=32)
    assert b.n_shared == 12 and b.n_past == 12  # the three full blocks
    assert b.tables["full"][:3] == a.tables["full"][:3]
    g = pool.groups["full"]
    assert all(g.ref[blk] == 2 for blk in a.tables["full"][:3])
    K, mask, _ = _write(pool, b, 1)
    assert K[0, mask[0], 0].tolist() == [float(p) for p in range(13)]
    assert pool.prefix_hits == 1 and pool.prefix_tokens == 12
    pool.release(a)
    pool.release(b)
    assert g.used == 0 and len(g.lru) == 3  # published blocks stay cached, evictable


def test_fully_cached_prompt_copies_the_last_block_on_write():
    pool = _pool(n_tokens=64, bs=4)
    prompt = list(range(50, 58))  # exactly 2 blocks
    a = pool.admit(prompt, n_tokens=12, n_ctx=32)
    _write(pool, a, 8)
    b = pool.admit(prompt, n_tokens=12, n_ctx=32)
    assert b.n_past == 7  # the last prompt token is re-evaluated for its logits
    shared_last = a.tables["full"][1]
    _write(pool, b, 1)
    assert b.tables["full"][1] != shared_last  # copy-on-write, the cached block is untouched
    K, _ = pool.read(0, torch.arange(shared_last * 4, shared_last * 4 + 4))
    assert K[0, :, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    pool.release(a)
    pool.release(b)
    assert pool.groups["full"].used == 0


def test_cached_blocks_are_evicted_when_space_is_needed():
    pool = _pool(n_tokens=16, bs=4)  # 4 blocks
    a = pool.admit(list(range(8)), n_tokens=8, n_ctx=16)
    _write(pool, a, 8)
    pool.release(a)
    assert len(pool.groups["full"].lru) == 2
    b = pool.admit(list(range(20, 36)), n_tokens=16, n_ctx=16, share=False)
    assert b is not None
    _write(pool, b, 16)  # needs all four blocks: the two cached ones are evicted
    assert pool.groups["full"].used == 4 and not pool.groups["full"].lru


def test_sliding_window_blocks_are_freed():
    pool = _pool(n_tokens=256, bs=4, window=4, max_batch=2)
    seq = pool.admit([1, 2], n_tokens=200, n_ctx=256)
    g = pool.groups["swa4"]
    for _ in range(100):
        view = pool.prepare(seq, 1)
        assert g.used <= seq.cap["swa4"] <= 4
    m = view.mask["swa4"][0]
    kp = [
        i * 4 + o for i, b in enumerate(seq.tables["swa4"]) if b >= 0 for o in range(4)
    ]  # key positions the view reads
    assert [p for p, vis in zip(kp, m.tolist()) if vis] == [96, 97, 98, 99]
    pool.release(seq)
    assert g.used == 0 and pool.groups["full"].used == 0


def test_sliding_group_shares_only_the_blocks_inside_the_window():
    pool = _pool(n_tokens=64, bs=4, window=4, max_batch=4, n_seq_max=2)
    prompt = list(range(30, 42))  # 3 full blocks
    a = pool.admit(prompt + [1], n_tokens=20, n_ctx=32)
    for n in (4, 4, 4, 1):  # prompt chunks of at most max_batch rows
        _write(pool, a, n)
    assert a.tables["swa4"][0] == -1  # positions 0-3 left every window: block given back
    b = pool.admit(prompt + [2], n_tokens=20, n_ctx=32)
    assert b.n_shared == 12
    assert b.tables["full"] == a.tables["full"][:3]
    # a query at position 12 with window 4 reaches back to position 9: block 2 only
    assert b.tables["swa4"] == [-1, -1, a.tables["swa4"][2]]
    _, _, view = _write(pool, b, 1)
    K, _ = pool.read(1, view.read["swa4"])
    assert [int(k) for k in K[0, view.mask["swa4"][0], 0]] == [9, 10, 11, 12]
    pool.release(a)
    pool.release(b)
    assert all(g.used == 0 and g.promised == 0 for g in pool.groups.values())


def test_rollback_returns_blocks_and_shared_prefix_is_protected():
    pool = _pool(n_tokens=64, bs=4)
    a = pool.admit(list(range(8)), n_tokens=30, n_ctx=32)
    _write(pool, a, 8)
    _write(pool, a, 6)
    assert pool.groups["full"].used == 4
    pool.truncate(a, 9)
    assert pool.groups["full"].used == 3 and a.n_past == 9
    b = pool.admit(list(range(8)) + [1], n_tokens=30, n_ctx=32)
    with pytest.raises(LlmkitError, match="shared prefix"):
        pool.truncate(b, 3)


# -- the batched forward through real (tiny) models -------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write = write_tiny_llama if request.param == "llama" else write_tiny_gemma3
    return load_model(write(d / "m.gguf", seed=3))


def _greedy_lone(lm, pool, prompt, n):
    seq = pool.admit(prompt, len(prompt) + n, 128, share=False)
    logits = lm.model.forward(torch.tensor(prompt), BatchCache(pool, [seq], [len(prompt)])).logits
    out = [int(logits[0].argmax())]
    rows = []
    for _ in range(n - 1):
        logits = lm.model.forward(torch.tensor(out[-1:]), BatchCache(pool, [seq], [1])).logits
        rows.append(logits[0])
        out.append(int(logits[0].argmax()))
    pool.release(seq)
    return out, rows


def test_paged_forward_matches_the_contiguous_cache(tiny):
    prompt = [1, 40, 41, 42, 43, 44, 45]
    cache = tiny.new_cache(128, margin=16)
    want = [int(tiny.model.forward(torch.tensor(prompt), cache).logits[0].argmax())]
    for _ in range(11):
        want.append(int(tiny.model.forward(torch.tensor(want[-1:]), cache).logits[0].argmax()))
    pool = PagedKV(tiny.model.kv_layout(), 512, 4, n_seq_max=4, max_batch=16)
    with torch.inference_mode():
        got, _ = _greedy_lone(tiny, pool, prompt, 12)
    assert got == want


def test_batched_decode_is_bit_identical_to_lone_runs(tiny):
    """bf16 weights: decode batches of <= 16 rows run every row through the M=1 kernel and
    attention per sequence, so each row's logits do not depend on its neighbours."""
    pool = PagedKV(tiny.model.kv_layout(), 1024, 4, n_seq_max=4, max_batch=16)
    prompts = [[1, 50 + i, 60, 61 + i, 70][: 3 + i] for i in range(3)]
    n = 8
    with torch.inference_mode():
        lone = [_greedy_lone(tiny, pool, p, n) for p in prompts]
        seqs = [pool.admit(p, len(p) + n, 128, share=False) for p in prompts]
        outs = []
        for s, p in zip(seqs, prompts):
            outs.append(
                [
                    int(
                        tiny.model.forward(torch.tensor(p), BatchCache(pool, [s], [len(p)]))
                        .logits[0]
                        .argmax()
                    )
                ]
            )
        rows = [[] for _ in prompts]
        for _ in range(n - 1):
            toks = torch.tensor([o[-1] for o in outs])
            logits = tiny.model.forward(toks, BatchCache(pool, seqs, [1] * 3), logits="all").logits
            for i, o in enumerate(outs):
                rows[i].append(logits[i])
                o.append(int(logits[i].argmax()))
    for (want, want_rows), got, got_rows in zip(lone, outs, rows):
        assert got == want
        assert all(torch.equal(a, b) for a, b in zip(want_rows, got_rows))
    for s in seqs:
        pool.release(s)
    assert all(g.used == 0 for g in pool.groups.values())
