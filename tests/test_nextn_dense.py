"""NextN blocks for llama / gemma3: the GGUF contract and the draft logits of a written head equal
the training module's, for every draft position (teacher-forced and drafted rows)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.decode.drafter import MTPDrafter
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.models.loader import arch_module, load_model
from llmkit.core.mtp_train.batchgen import BatchedTrunk, topk_teacher
from llmkit.core.mtp_train.data import Sequence, draft_vocab, to_batch
from llmkit.core.mtp_train.export import write_merged, write_sidecar
from llmkit.core.mtp_train.module import TrainBlock, init_from_trunk
from llmkit.core.mtp_train.streams import stream_forward, student_logits
from llmkit.errors import LlmkitError
from tiny_models import write_tiny_gemma3, write_tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: one thread avoids OpenMP sync costs on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _blocks(lm, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c = lm.config
    blocks = []
    for _ in range(n):
        arch = arch_module(lm.arch)
        b = TrainBlock(arch, init_from_trunk(arch, c, lm.tensors, 3.0, gen))
        with torch.no_grad():  # move away from the init so every weight matters
            for p in b.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        blocks.append(b)
    return torch.nn.ModuleList(blocks)


def _write_head(lm, blocks, path):
    tensors = {}
    for j, b in enumerate(blocks):
        tensors |= b.gguf_tensors(lm.config.n_layer + j)
    return write_sidecar(path, lm.gguf, tensors, len(blocks), QT.F32, {"steps": 0})


@pytest.fixture(params=["llama", "gemma3"])
def base(request, tmp_path):
    write = write_tiny_llama if request.param == "llama" else write_tiny_gemma3
    return write(tmp_path / f"{request.param}.gguf", seed=3)


def _teacher(lm, ids):
    logits, h = lm.model.forward(torch.tensor(ids), lm.new_cache(64, 16), "all")
    top = topk_teacher(logits, 8)
    return Sequence(torch.tensor(ids), h, *top, "text")


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_written_head_reproduces_training_logits(base, tmp_path, n_blocks):
    lm32 = load_model(base, kernels="torch")
    blocks = _blocks(lm32, n_blocks)
    head = _write_head(lm32, blocks, tmp_path / "head.gguf")
    lm = load_model(base, kernels="torch", mtp=True, draft_path=head)
    assert lm.model.mtp.n_heads == n_blocks
    ids = [1, 40, 7, 99, 12, 5, 300, 17, 8, 42, 9, 11, 260, 3, 77, 18]
    seq = _teacher(lm, ids)
    b = to_batch([seq])
    c = lm.config
    emb = lm.model.embed(b.tokens.reshape(-1)).view(1, len(ids), -1)
    head_w = lm.tensors["token_embd.weight"].dequantize()
    with torch.no_grad():
        outs = stream_forward(lm.model.block, c, blocks, emb, b, 3, c.n_layer)
    # inference: for each round start r, mirror [0, r) then draft with the true tokens
    for r in range(1, len(ids) - 3):
        mtp = MTPDrafter(lm.model.mtp, 64, 16, "f32", "f32")
        mtp.observe(0, torch.tensor(ids[:r]), seq.hidden[:r])
        hs = [mtp.state.pending_h]
        for d in range(1, 4):
            toks = ids[r : r + d]
            j = 0 if n_blocks == 1 else d - 1
            if n_blocks > 1:
                mtp.caches[j].truncate(r)
                got, h_out = lm.model.mtp.forward(
                    j, torch.tensor(toks), torch.stack(hs), mtp.caches[j], "last"
                )
            else:
                got, h_out = lm.model.mtp.forward(
                    0, torch.tensor(toks[-1:]), hs[-1][None], mtp.caches[0], "last"
                )
            hs.append(h_out[-1])
            q = r + d - 1
            want = student_logits(c, blocks[j].shared_head_norm, head_w, outs[d - 1][0, q : q + 1])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


def test_gguf_contract_and_layouts(base, tmp_path):
    lm32 = load_model(base, kernels="torch")
    blocks = _blocks(lm32, 2)
    head = _write_head(lm32, blocks, tmp_path / "head.gguf")
    c = lm32.config
    md = GGUFFile(head).metadata
    assert md[f"{lm32.arch}.block_count"] == c.n_layer + 2
    assert md[f"{lm32.arch}.nextn_predict_layers"] == 2
    names = set(GGUFFile(head).tensors)
    assert f"blk.{c.n_layer}.nextn.eh_proj.weight" in names
    assert f"blk.{c.n_layer + 1}.nextn.shared_head_norm.weight" in names
    assert not any(n.startswith("token_embd") for n in names)  # the base's embedding is used
    tensors = {}
    for j, b in enumerate(blocks):
        tensors |= b.gguf_tensors(c.n_layer + j)
    merged = write_merged(tmp_path / "m.gguf", lm32.gguf, tensors, 2, None, {"steps": 0})
    lm = load_model(merged, mtp=True)
    layout = lm.model.mtp.kv_layout()
    assert sorted(layout) == [c.n_layer, c.n_layer + 1]
    if lm.arch == "gemma3":  # NextN blocks continue the local/global pattern: 7 and 8 are local
        assert all(v.window == c.sliding_window for v in layout.values())
    assert lm.model.kv_layout().keys() == set(range(c.n_layer))
    plain = load_model(merged)  # without --mtp the NextN blocks are never read
    assert plain.model.mtp is None and plain.config.n_layer == c.n_layer


def test_batched_generation_matches_the_trunk(base):
    lm = load_model(base, kernels="torch")
    prompts = [[1, 40, 7, 99], [1, 12, 5], [1, 300, 17, 8, 42, 9]]
    gen = torch.Generator().manual_seed(0)
    out = BatchedTrunk(lm).generate(prompts, 12, [0.0] * 3, gen, lambda t: False, 4)
    for p, g in zip(prompts, out, strict=True):
        ids = g.tokens.tolist()
        assert ids[: len(p)] == p and len(ids) == len(p) + 11
        logits, h = lm.model.forward(g.tokens, lm.new_cache(64, 16), "all")
        assert logits.argmax(-1)[len(p) - 1 : -1].tolist() == ids[len(p) :]  # greedy
        torch.testing.assert_close(g.hidden, h, rtol=1e-3, atol=1e-2)  # the cache keeps f16 K/V
        torch.testing.assert_close(
            g.logits_topk[2], torch.logsumexp(logits, -1), rtol=1e-4, atol=1e-3
        )


def test_draft_vocabulary_restricts_draft_logits(base, tmp_path):
    lm32 = load_model(base, kernels="torch")
    head = _write_head(lm32, _blocks(lm32, 1), tmp_path / "head.gguf")
    lm = load_model(base, kernels="torch", mtp=True, draft_path=head)
    ids = [1, 40, 7, 99, 12, 5, 300, 17]
    seq = _teacher(lm, ids)
    full = []
    for vocab in (None, torch.tensor([3, 5, 17, 40, 41, 99, 200])):
        lm.model.mtp.set_draft_vocab(vocab)
        mtp = MTPDrafter(lm.model.mtp, 64, 16, "f32", "f32")
        mtp.observe(0, torch.tensor(ids[:5]), seq.hidden[:5])
        pending = mtp.state.pending_h[None]
        z, _ = lm.model.mtp.forward(0, torch.tensor(ids[5:6]), pending, mtp.caches[0])
        full.append(z[0])
    z_all, z_short = full
    keep = torch.tensor([3, 5, 17, 40, 41, 99, 200])
    torch.testing.assert_close(z_short[keep], z_all[keep], rtol=1e-5, atol=1e-5)
    rest = torch.ones_like(z_all, dtype=torch.bool)
    rest[keep] = False
    assert torch.isneginf(z_short[rest]).all()
    with pytest.raises(LlmkitError, match="draft vocabulary"):
        lm.model.mtp.set_draft_vocab(torch.tensor([0, lm.config.n_vocab]))


@pytest.mark.parametrize("vocab", [None, [3, 5, 17, 40, 41, 99, 200]])
def test_native_draft_step_is_the_separate_calls(base, tmp_path, vocab, monkeypatch):
    """A draft pass on the native CPU path is one call (kernels/cpu_block.NextNSite): the same
    hidden rows and draft logits, bit for bit, as the head's forward and draft_logits call by
    call, for passes of 1..5 rows (mirrored rows folded in) over a cache that already holds
    rows."""
    from llmkit.core.cache.kv import KVCache
    from llmkit.kernels import cpu_block

    lm32 = load_model(base, kernels="torch")
    head = _write_head(lm32, _blocks(lm32, 1), tmp_path / "head.gguf")
    lm = load_model(base, mtp=True, draft_path=head)
    heads, H = lm.model.mtp, lm.config.n_embd
    heads.set_draft_vocab(torch.tensor(vocab) if vocab is not None else None)
    calls = [0]
    orig = cpu_block.NextNSite.__call__
    monkeypatch.setattr(cpu_block.NextNSite, "__call__", lambda *a: calls.__setitem__(0, calls[0] + 1) or orig(*a))  # fmt: skip

    def run():
        gen, out = torch.Generator().manual_seed(1), []
        with torch.inference_mode():
            cache = MTPDrafter(heads, 64, 8).kv.caches[0]
            heads.forward(0, torch.randint(0, 300, (6,), generator=gen),
                          torch.randn(6, H, generator=gen), cache, logits=None)  # fmt: skip
            for t in (1, 2, 5, 3, 1):
                rows = [t - 1] if t < 3 else [0, t - 1]
                tokens = torch.randint(0, 300, (t,), generator=gen)
                x, z, ids = heads.draft_step(0, tokens, torch.randn(t, H, generator=gen) * 3,
                                             cache, rows)  # fmt: skip
                assert (ids is None) == (vocab is None)
                out += [x, z]
        return out

    native = run()
    assert calls[0] == 5
    monkeypatch.setattr(KVCache, "native_step", lambda self, il: None)
    separate = run()
    assert calls[0] == 5
    assert all(torch.equal(a, b) for a, b in zip(native, separate, strict=True))


def test_draft_vocab_ranks_teacher_argmaxes():
    def seq(top1):
        t = torch.tensor(top1)
        n = t.numel()
        ids = torch.stack((t, t + 1), 1).int()
        return Sequence(t, torch.zeros(n, 2), ids, torch.zeros(n, 2).half(), torch.zeros(n), "text")

    ids, cov = draft_vocab([seq([4, 4, 4, 2, 2, 9]), seq([2, 7])], 2, 16)
    assert ids.tolist() == [2, 4] and cov == pytest.approx(6 / 8)
    assert draft_vocab([seq([1])], 0, 16) == (None, 1.0)
    assert draft_vocab([seq([1])], 16, 16) == (None, 1.0)
