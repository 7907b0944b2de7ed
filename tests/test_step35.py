"""Tiny random step35 models: the cached, fused trunk and NextN (MTP) blocks equal a naive
full-sequence reference written independently here (explicit per-head loops, masks, per-token MoE,
clamps, gates, partial NEOX rope with factors); incremental decoding equals one batch; MoE grouping,
--moe-n-expert, the three file layouts, and a greedy chain-of-heads speculative run."""

import math
from collections import Counter

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llmkit.core.cache.kv import KVCache
from llmkit.core.gguf.reader import GGUFFile
from llmkit.core.model.config import read_config
from llmkit.core.model.weights import load_tensors
from llmkit.core.models import step35
from llmkit.errors import LlmkitError
from llmkit.kernels.backend import Backend
from llmkit.kernels.ops import make_expert_linear
from llmkit.quant.tensor import QTensor
from tiny_step35 import write_tiny_step35

TOKENS = torch.tensor([1, 17, 300, 5, 260, 261, 44, 9, 270, 120, 3, 77, 265, 290, 8, 263])
T = len(TOKENS)
DRAFT_NOISE = 0.2  # seed 4: 9 full, 9 partial, 8 rejected rounds in 64 tokens


# ---------------------------------------------------------------------------------------------
# loading


def load(path, parts=("trunk",), **over):
    gf = GGUFFile(path)
    n_vocab = gf.tensors["token_embd.weight"].shape[0]
    cfg = read_config(step35.Config, gf.metadata, "step35", n_vocab=n_vocab, **over)
    specs = [s for p in parts for s in step35.tensor_specs(cfg, p, gf.tensors)]
    ranges = {"trunk": range(cfg.n_layer), "mtp": range(cfg.n_layer, cfg.n_layer_all)}
    keep = {il for p in parts for il in ranges[p]}
    ignore = tuple(f"blk.{il}." for il in range(cfg.n_layer_all) if il not in keep)
    return cfg, load_tensors(gf, specs, ignore_prefixes=ignore)


def build(cfg, tensors, mtp=False, dtype=torch.float32):
    return step35.Model(cfg, tensors, Backend(weight_dtype=dtype, kernels="torch"), mtp=mtp)


def model(path, parts=("trunk",), dtype=torch.float32, **over):
    cfg, t = load(path, parts, **over)
    return build(cfg, t, mtp="mtp" in parts, dtype=dtype)


def f32_cache(layout, n_ctx=64, margin=32):
    return KVCache(layout, n_ctx, margin, "f32", "f32")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("step35")
    return {
        "full": write_tiny_step35(d / "full.gguf"),
        "trunk": write_tiny_step35(d / "trunk.gguf", layout="trunk"),
        "mtp": write_tiny_step35(d / "mtp-sidecar.gguf", layout="mtp"),
        # MoE + full-attention NextN block, softmax gating
        "kinds": write_tiny_step35(
            d / "kinds.gguf", seed=1, moe_layers=(2, 3, 5), full_layers=(0, 4), gating=1
        ),
    }


@pytest.fixture(scope="module")
def full(files):
    return model(files["full"], ("trunk", "mtp"))


# ---------------------------------------------------------------------------------------------
# naive reference


def _W(t, name):
    return t[name].dequantize()


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, n_rot, base, factors=None):  # NEOX pairs (i, i + n_rot/2); dims >= n_rot kept
    out = x.clone()
    half = n_rot // 2
    for i in range(half):
        th = pos.double() * base ** (-2 * i / n_rot)
        if factors is not None:
            th = th / float(factors[i])
        c, s = torch.cos(th).float()[:, None], torch.sin(th).float()[:, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i], out[..., i + half] = a * c - b * s, a * s + b * c
    return out


def _attn(q, k, v, scale, window):  # q [T,Hq,D], k/v [T,Hkv,D]: explicit causal + window mask
    n, Hq, _ = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(n, Hq, v.shape[-1])
    for t in range(n):
        visible = torch.tensor([j <= t and (window is None or t - j < window) for j in range(n)])
        for h in range(Hq):
            s = (k[:, h // g] @ q[t, h]) * scale
            s = s.masked_fill(~visible, float("-inf"))
            out[t, h] = torch.softmax(s, 0) @ v[:, h // g]
    return out


def _swiglu(g, u, limit, clamp=True):
    a = g * torch.sigmoid(g)
    if clamp and limit > 0:
        a = torch.minimum(a, torch.tensor(limit))
        u = torch.clamp(u, -limit, limit)
    return a * u


def naive_moe(c, t, il, f, k, clamp=True):
    b = f"blk.{il}."
    Wr, bias = _W(t, b + "ffn_gate_inp.weight"), _W(t, b + "exp_probs_b.bias")
    Wg, Wu = _W(t, b + "ffn_gate_exps.weight"), _W(t, b + "ffn_up_exps.weight")
    Wd = _W(t, b + "ffn_down_exps.weight")
    y = torch.zeros_like(f)
    for r in range(f.shape[0]):
        lg = Wr @ f[r]
        p = torch.sigmoid(lg) if c.expert_gating_func == 2 else torch.softmax(lg, 0)
        top = torch.argsort(p + bias, descending=True)[:k]
        w = p[top]
        w = w / max(float(w.sum()), 6.103515625e-5)
        w = w * c.expert_weights_scale
        for j, e in enumerate(top.tolist()):
            h = _swiglu(Wg[e] @ f[r], Wu[e] @ f[r], c.swiglu_clamp_exp[il], clamp)
            y[r] += w[j] * (Wd[e] @ h)
    return y


def naive_block(c, t, il, x, clamp=True):
    b = f"blk.{il}."
    n, D = x.shape[0], c.head_dim
    hq, hkv, swa = c.n_head[il], c.n_head_kv[il], c.swa[il]
    pos = torch.arange(n)
    a = _rms(x, _W(t, b + "attn_norm.weight"), c.eps)
    q = _rms(
        (a @ _W(t, b + "attn_q.weight").T).view(n, hq, D), _W(t, b + "attn_q_norm.weight"), c.eps
    )
    k = _rms(
        (a @ _W(t, b + "attn_k.weight").T).view(n, hkv, D), _W(t, b + "attn_k_norm.weight"), c.eps
    )
    v = (a @ _W(t, b + "attn_v.weight").T).view(n, hkv, D)
    if swa:  # all head dims, swa base, no factors
        q, k = _rope(q, pos, D, c.rope_base_swa), _rope(k, pos, D, c.rope_base_swa)
    else:  # half the dims, full base, llama3 factors
        ff = t["rope_freqs.weight"].dequantize()
        q, k = _rope(q, pos, D // 2, c.rope_base, ff), _rope(k, pos, D // 2, c.rope_base, ff)
    o = _attn(q, k, v, 1 / math.sqrt(D), c.sliding_window if swa else None)
    if b + "attn_gate.weight" in t:
        o = o * torch.sigmoid(a @ _W(t, b + "attn_gate.weight").T)[..., None]
    x = x + o.reshape(n, -1) @ _W(t, b + "attn_output.weight").T
    f = _rms(x, _W(t, b + "ffn_norm.weight"), c.eps)
    lim = c.swiglu_clamp_shexp[il]
    if b + "ffn_gate_inp.weight" in t:
        sh = "_shexp"
        y = naive_moe(c, t, il, f, c.top_k(), clamp)
    else:
        sh, y = "", 0
    g, u = f @ _W(t, b + f"ffn_gate{sh}.weight").T, f @ _W(t, b + f"ffn_up{sh}.weight").T
    return x + y + _swiglu(g, u, lim, clamp) @ _W(t, b + f"ffn_down{sh}.weight").T


def naive_trunk(m, tokens, clamp=True):
    c, t = m.config, m.tensors
    x = _W(t, "token_embd.weight")[tokens]
    for il in range(c.n_layer):
        x = naive_block(c, t, il, x, clamp)
    head = t.get("output.weight") or t["token_embd.weight"]
    return _rms(x, _W(t, "output_norm.weight"), c.eps) @ head.dequantize().T, x


def naive_mtp(m, head, tokens, h):
    c, t = m.config, m.tensors
    il = c.n_layer + head
    b = f"blk.{il}.nextn."
    E = t.get(b + "embed_tokens.weight") or t["token_embd.weight"]
    e = _rms(E.dequantize()[tokens], _W(t, b + "enorm.weight"), c.eps)
    u = torch.cat((e, _rms(h, _W(t, b + "hnorm.weight"), c.eps)), -1)
    x = naive_block(c, t, il, u @ _W(t, b + "eh_proj.weight").T)
    norm = t.get(b + "shared_head_norm.weight") or t["output_norm.weight"]
    W = t.get(b + "shared_head_head.weight") or t["output.weight"]
    return _rms(x, norm.dequantize(), c.eps) @ W.dequantize().T, x


def shifted(h):  # MTP row p pairs token p with the trunk hidden of p-1 (zeros for p = 0)
    return torch.cat((torch.zeros(1, h.shape[1]), h[:-1]))


# ---------------------------------------------------------------------------------------------
# forward equals the reference


@pytest.mark.parametrize("name", ["full", "kinds"])
def test_trunk_and_mtp_match_naive(files, name):
    m = model(files[name], ("trunk", "mtp"))
    with torch.inference_mode():
        got, h = m.forward(TOKENS, f32_cache(m.kv_layout()), "all")
        ref, ref_h = naive_trunk(m, TOKENS)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)
        assert m.mtp.n_heads == 3
        for head in range(m.mtp.n_heads):
            hin = shifted(h)
            lg, ho = m.mtp.forward(head, TOKENS, hin, f32_cache(m.mtp.kv_layout()), "all")
            ref_lg, ref_ho = naive_mtp(m, head, TOKENS, hin)
            torch.testing.assert_close(lg, ref_lg, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ho, ref_ho, rtol=1e-4, atol=1e-4)


def test_clamps_bite(full):
    with torch.inference_mode():
        got = full.forward(TOKENS, f32_cache(full.kv_layout()), "all").logits
        unclamped, _ = naive_trunk(full, TOKENS, clamp=False)
    assert (got - unclamped).abs().max() > 1e-2  # the tiny model's clamps really bite
    c = full.config
    assert c.swa[1] and not c.swa[0] and c.n_head[0] != c.n_head[1] and c.sliding_window < T


def test_hidden_is_pre_norm_for_all_rows(full):
    with torch.inference_mode():
        last, h = full.forward(TOKENS, f32_cache(full.kv_layout()), "last")
        lg, ho = full.mtp.forward(0, TOKENS, shifted(h), f32_cache(full.mtp.kv_layout()))
    assert h.shape == (T, 64) and last.shape == (1, 320)
    c, t = full.config, full.tensors
    head = _rms(h[-1:], _W(t, "output_norm.weight"), c.eps) @ _W(t, "output.weight").T
    torch.testing.assert_close(last, head, rtol=1e-4, atol=1e-4)
    assert lg.shape == (1, 320) and ho.shape == (T, 64)  # "last": one logits row, every hidden


def test_incremental_decode_equals_one_batch(full):
    with torch.inference_mode():
        ref, h = full.forward(TOKENS, f32_cache(full.kv_layout()), "all")
        cache = f32_cache(full.kv_layout(), margin=3)  # ring of 4 + 3 slots: wraps
        steps = [full.forward(TOKENS[:3], cache, "all").logits]
        steps += [full.forward(TOKENS[i : i + 1], cache).logits for i in range(3, T)]
        torch.testing.assert_close(torch.cat(steps), ref, rtol=1e-4, atol=1e-4)
        hin = shifted(h)
        ref_lg, _ = full.mtp.forward(1, TOKENS, hin, f32_cache(full.mtp.kv_layout()), "all")
        mc = f32_cache(full.mtp.kv_layout(), margin=3)
        lgs = [
            full.mtp.forward(1, TOKENS[i : i + 2], hin[i : i + 2], mc, "all").logits
            for i in range(0, T, 2)
        ]
        torch.testing.assert_close(torch.cat(lgs), ref_lg, rtol=1e-4, atol=1e-4)


def test_bf16_backend_stays_close(files, full):
    lm = model(files["full"], dtype=torch.bfloat16)
    with torch.inference_mode():
        a = full.forward(TOKENS, f32_cache(full.kv_layout()), "all").logits
        b = lm.forward(TOKENS, f32_cache(lm.kv_layout()), "all").logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert lm.backend.extra_bytes > 0


# ---------------------------------------------------------------------------------------------
# MoE


def test_grouped_moe_equals_per_token_loop(full):
    c, t = full.config, full.tensors
    f = torch.randn(9, c.n_embd, generator=torch.Generator().manual_seed(0))
    for il in (2, 3):
        moe = full.blocks[il].moe
        torch.testing.assert_close(moe(f, 2), naive_moe(c, t, il, f, 2), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            moe(f[:1], 2), naive_moe(c, t, il, f[:1], 2), rtol=1e-4, atol=1e-5
        )


def test_only_selected_experts_run_once_each(full, monkeypatch):
    moe = full.blocks[2].moe
    calls = []  # (expert, rows) per gate matmul

    def counting(x, e, inner=moe.gate):
        calls.append((e, x.shape[0]))
        return inner(x, e)

    monkeypatch.setattr(moe, "gate", counting)
    f = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    top, _ = moe.route(f, 2)
    moe(f, 2)
    used = torch.unique(top).tolist()
    assert sorted(e for e, _ in calls) == used  # one gate matmul per expert present
    assert {e: n for e, n in calls} == {e: int((top == e).sum()) for e in used}
    calls.clear()
    moe(f[:1], 2)  # decode: exactly k experts, one row each
    assert len(calls) == 2 and all(n == 1 for _, n in calls)


def test_moe_n_expert_override(files, full):
    with torch.inference_mode():
        ref = full.forward(TOKENS, f32_cache(full.kv_layout()), "all").logits
        one = model(files["full"], n_expert_used_override=1)
        got = one.forward(TOKENS, f32_cache(one.kv_layout()), "all").logits
        naive, _ = naive_trunk(one, TOKENS)
    assert (got - ref).abs().max() > 1e-2
    torch.testing.assert_close(got, naive, rtol=1e-4, atol=1e-4)
    # the kept experts' weights are renormalised: one expert gets the whole scale
    f = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for k in (1, 3):
        top, w = one.blocks[2].moe.route(f, k)
        assert top.shape == (5, k)
        torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.5))
    for bad in (0, 7):
        with pytest.raises(LlmkitError, match="moe-n-expert"):
            load(files["full"], n_expert_used_override=bad)


def test_expert_linear_regimes():
    w = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(2))
    be = Backend(weight_dtype=torch.bfloat16, kernels="torch")
    lin = make_expert_linear(be, QTensor("x", QT.F32, (3, 8, 32), w))  # float storage is accepted
    assert be.extra_bytes == 3 * 8 * 32 * 2 and lin.experts[1].weight.dtype == torch.bfloat16
    for M in (1, 7):  # GEMV (bf16) and GEMM (fp32 upcast on CPUs without native bf16)
        x = torch.randn(M, 32)
        y = lin(x, 1)
        assert y.dtype == torch.float32 and y.shape == (M, 8)
        torch.testing.assert_close(y, x @ w[1].T, rtol=2e-2, atol=5e-2)
    with pytest.raises(LlmkitError, match="3-D"):
        make_expert_linear(be, QTensor("y", QT.F32, (24, 32), w.reshape(24, 32)))


# ---------------------------------------------------------------------------------------------
# file layouts and tensor contract


def test_trunk_only_load_skips_nextn(files):
    cfg, t = load(files["full"])
    assert cfg.n_layer == 4 and cfg.n_layer_all == 7 and cfg.n_nextn == 3
    assert not [n for n in t if n.startswith(("blk.4.", "blk.5.", "blk.6."))]
    assert step35.moe_layers(GGUFFile(files["full"]).tensors) == {2, 3}
    m = build(cfg, t)
    assert m.mtp is None and sorted(m.kv_layout()) == [0, 1, 2, 3]  # no NextN heads loaded
    # a trunk-only file that still declares the NextN blocks loads the same trunk
    cfg2, t2 = load(files["trunk"])
    assert cfg2.n_layer_all == 7 and set(t2) == set(t)


def test_trunk_file_plus_sidecar_equals_full(files, full):
    cfg, t = load(files["trunk"])
    _, side = load(files["mtp"], ("mtp",))
    assert not [n for n in side if n.startswith("blk.") and int(n.split(".")[1]) < 4]
    m = build(cfg, {**t, **side}, mtp=True)
    assert sorted(m.mtp.kv_layout()) == [4, 5, 6]
    with torch.inference_mode():
        a, ha = full.forward(TOKENS, f32_cache(full.kv_layout()), "all")
        b, hb = m.forward(TOKENS, f32_cache(m.kv_layout()), "all")
        assert torch.equal(a, b)
        for head in range(3):
            x = full.mtp.forward(head, TOKENS, shifted(ha), f32_cache(full.mtp.kv_layout()), "all")
            y = m.mtp.forward(head, TOKENS, shifted(hb), f32_cache(m.mtp.kv_layout()), "all")
            assert torch.equal(x.logits, y.logits) and torch.equal(x.hidden, y.hidden)


def test_missing_and_extra_tensors_error(files, tmp_path):
    with pytest.raises(LlmkitError, match="missing tensor blk.0.attn_norm.weight"):
        load(files["mtp"])  # the sidecar has no trunk
    with pytest.raises(LlmkitError, match="missing tensor blk.4.attn_norm.weight"):
        load(files["trunk"], ("trunk", "mtp"))
    p = write_tiny_step35(
        tmp_path / "drop.gguf", edit=lambda md, t: t.pop("blk.3.ffn_up_exps.weight")
    )
    with pytest.raises(LlmkitError, match="missing tensor blk.3.ffn_up_exps.weight"):
        load(p)
    extra = tmp_path / "extra.gguf"
    write_tiny_step35(
        extra, edit=lambda md, t: t.update({"blk.1.bogus.weight": t["blk.1.attn_norm.weight"]})
    )
    with pytest.raises(LlmkitError, match="unexpected tensor blk.1.bogus.weight"):
        load(extra)


def test_config_errors(files, tmp_path):
    md = dict(GGUFFile(files["full"]).metadata)
    with pytest.raises(LlmkitError, match="nextn_predict_layers"):
        read_config(step35.Config, {**md, "step35.nextn_predict_layers": 7}, "step35", n_vocab=320)
    with pytest.raises(LlmkitError, match="head_count has 3 entries"):
        read_config(
            step35.Config, {**md, "step35.attention.head_count": [4, 6, 6]}, "step35", n_vocab=320
        )
    with pytest.raises(LlmkitError, match="expert_gating_func 3"):
        read_config(step35.Config, {**md, "step35.expert_gating_func": 3}, "step35", n_vocab=320)
    cfg = read_config(step35.Config, md, "step35", n_vocab=320)
    assert cfg.n_rot_full == 8 and cfg.n_rot == 16 and cfg.top_k() == 2
    # a conversion without NextN blocks: no nextn key, trunk only; asking for MTP is an error
    p = write_tiny_step35(tmp_path / "nomtp.gguf", n_nextn=0)
    cfg0, t0 = load(p)
    assert cfg0.n_layer == cfg0.n_layer_all == 4 and build(cfg0, t0).mtp is None
    with pytest.raises(LlmkitError, match="declares no NextN"):
        build(cfg0, t0, mtp=True)


# ---------------------------------------------------------------------------------------------
# speculative decoding with chained heads (the contract a driver relies on)


def spec_greedy(m, prompt, n_new):
    """Greedy draft-and-verify with chained MTP heads (llama.cpp's chain_heads mode); each head's
    KV is rebuilt from the target hidden states every round (simple, not fast)."""
    H = m.config.n_embd
    cache = f32_cache(m.kv_layout(), n_ctx=128, margin=8)
    lg, h = m.forward(prompt, cache, "last")
    seq, hs, stats = prompt.tolist(), [h], Counter()
    while len(seq) - len(prompt) < n_new:
        id_last, pos0 = int(lg[-1].argmax()), len(seq)
        h_rows = shifted(torch.cat(hs + [torch.zeros(1, H)]))  # [pos0 + 1, H]
        drafts, chain_h = [], []
        for k in range(m.mtp.n_heads):
            il = m.config.n_layer + k
            hc = f32_cache({il: m.mtp.kv_layout()[il]}, n_ctx=128, margin=128)
            toks = torch.tensor(seq + [id_last] + drafts)
            dl, ho = m.mtp.forward(k, toks, torch.cat([h_rows] + chain_h), hc)
            drafts.append(int(dl[-1].argmax()))
            chain_h.append(ho[-1:])  # the last row: what this head drafted from
        batch = [id_last] + drafts
        vl, hv = m.forward(torch.tensor(batch), cache, "all")
        n_acc = 0
        while n_acc < len(drafts) and int(vl[n_acc].argmax()) == drafts[n_acc]:
            n_acc += 1
        stats["full" if n_acc == len(drafts) else "partial" if n_acc else "reject"] += 1
        seq += batch[: n_acc + 1]
        hs.append(hv[: n_acc + 1])
        cache.truncate(pos0 + n_acc + 1)
        lg = vl[n_acc : n_acc + 1]
    return seq[len(prompt) :][:n_new], stats


def plain_greedy(m, prompt, n_new):
    cache = f32_cache(m.kv_layout(), n_ctx=128, margin=8)
    lg = m.forward(prompt, cache).logits
    out = []
    for _ in range(n_new):
        out.append(int(lg[-1].argmax()))
        lg = m.forward(torch.tensor(out[-1:]), cache).logits
    return out


def test_drafty_model_spec_decode(tmp_path):
    p = write_tiny_step35(tmp_path / "drafty.gguf", seed=4, draft_noise=DRAFT_NOISE)
    m = model(p, ("trunk", "mtp"))
    with torch.inference_mode():
        got, stats = spec_greedy(m, TOKENS[:5], 64)
        assert got == plain_greedy(m, TOKENS[:5], 64)
    assert stats["full"] and stats["partial"] and stats["reject"], stats
