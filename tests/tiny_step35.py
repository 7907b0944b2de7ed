"""Tiny random `step35` GGUFs (trunk + NextN/MTP blocks) for fast tests, in the three file layouts
llama.cpp knows: "full" (trunk + NextN), "trunk" (trunk only, metadata still declares the NextN
blocks) and "mtp" (the MTP-only sidecar: NextN blocks + token_embd, output_norm, output).

Default geometry: n_main = 4 trunk layers + 3 NextN blocks; H = 64, head_dim 16, full-attention
layers (il % 4 == 0 in the trunk) 4 query heads, sliding layers 6 (window 4), 2 kv heads everywhere;
layers 0-1 dense, 2-3 MoE (6 experts, top-2, sigmoid + selection bias, normalised, x2.5, shared
expert); SwiGLU clamps on layers 1-4; rope_freqs factors; head gates on all blocks but the last;
NextN head 1 has its own shared_head_head, head 2 its own embed_tokens. Every tensor is drawn from
one RNG in a fixed order whatever the layout, so trunk file + sidecar hold exactly the full file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from llmkit.core.gguf.writer import encode_tensor, write_gguf
from tiny_models import spm_vocab

# per-layer weight types: a mix of block quantizations and floats (all exercised by dequant)
QTYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.F16, QT.F32]
LAYOUTS = ("full", "trunk", "mtp")


def _w(rng, *shape, scale=0.08):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _norm(rng, n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def write_tiny_step35(
    path: Path,
    seed: int = 0,
    layout: str = "full",
    n_main: int = 4,
    n_nextn: int = 3,
    n_vocab: int = 320,
    n_embd: int = 64,
    head_dim: int = 16,
    n_head_full: int = 4,
    n_head_swa: int = 6,
    n_head_kv: int = 2,
    n_ff: int = 64,
    n_expert: int = 6,
    n_expert_used: int = 2,
    n_ff_exp: int = 32,
    n_ff_shexp: int = 32,
    window: int = 4,
    moe_layers: tuple[int, ...] = (2, 3),
    full_layers: tuple[int, ...] | None = None,
    gating: int | None = None,
    draft_noise: float | None = None,
    edit=None,
) -> Path:
    """Write a tiny step35 GGUF; returns `path`.

    full_layers: blocks with full attention (default: trunk il % 4 == 0; NextN blocks slide).
    gating: expert_gating_func to write (None: key absent, i.e. sigmoid).
    draft_noise: None for a plain random model. A float builds a model whose MTP heads are often
      right: the trunk's attention/FFN outputs are scaled by `draft_noise`, so the trunk is nearly
      a bigram model (logits ~ output(norm(embed(tok)))), and each NextN block copies the token
      embedding through eh_proj with near-zero attention/FFN, so it predicts that same bigram. 0
      gives (almost) always-accepted drafts; larger values make the trunk deviate more often.
    edit(metadata, tensors): may change either before writing.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    rng = np.random.default_rng(seed)
    n_all = n_main + n_nextn
    H = n_embd
    if full_layers is None:
        full_layers = tuple(il for il in range(n_main) if il % 4 == 0)
    swa = [il not in full_layers for il in range(n_all)]
    n_head = [n_head_swa if s else n_head_full for s in swa]
    clamp_exp = np.zeros(n_all, np.float32)
    clamp_shexp = np.zeros(n_all, np.float32)
    clamp_exp[2 % n_all] = 0.5  # a routed-expert clamp (layer 2 is MoE by default)
    clamp_shexp[1 % n_all] = 0.3  # dense FFN clamp
    clamp_shexp[3 % n_all] = 0.25  # shared-expert clamp
    if n_nextn:
        clamp_shexp[n_main] = 0.3  # first NextN block (dense) clamps too
    md = {
        "step35.context_length": 256,
        "step35.embedding_length": H,
        "step35.block_count": n_all,
        "step35.feed_forward_length": n_ff,
        "step35.attention.head_count": np.array(n_head, np.int32),
        "step35.attention.head_count_kv": np.array([n_head_kv] * n_all, np.int32),
        "step35.attention.key_length": head_dim,
        "step35.attention.value_length": head_dim,
        "step35.attention.layer_norm_rms_epsilon": 1e-5,
        "step35.attention.sliding_window": window,
        "step35.attention.sliding_window_pattern": np.array(swa, np.bool_),
        "step35.rope.freq_base": 10000.0,
        "step35.rope.freq_base_swa": 500.0,
        "step35.leading_dense_block_count": 2,  # written by the converter; presence decides
        "step35.expert_count": n_expert,
        "step35.expert_used_count": n_expert_used,
        "step35.expert_feed_forward_length": n_ff_exp,
        "step35.expert_shared_feed_forward_length": n_ff_shexp,
        "step35.expert_weights_norm": True,
        "step35.expert_weights_scale": 2.5,
        "step35.swiglu_clamp_exp": clamp_exp,
        "step35.swiglu_clamp_shexp": clamp_shexp,
        "general.size_label": "tiny",
        "general.file_type": 7,
        **spm_vocab(n_vocab),
    }
    if n_nextn:
        md["step35.nextn_predict_layers"] = n_nextn
    if gating is not None:
        md["step35.expert_gating_func"] = gating

    drafty = draft_noise is not None
    emb = _w(rng, n_vocab, H, scale=1.0)
    out_w = _w(rng, n_vocab, H)
    out_norm = _norm(rng, H)
    # llama3-style factors for the full layers' rotated dims (first n_rot_full/2 used), 1.0 padding
    rope_freqs = np.ones(head_dim // 2, np.float32)
    rope_freqs[: head_dim // 4] = np.geomspace(1.0, 6.0, head_dim // 4)
    glob = {
        "token_embd.weight": encode_tensor(emb, QT.Q8_0),
        "output_norm.weight": out_norm,
        "output.weight": encode_tensor(out_w, QT.Q8_0),
        "rope_freqs.weight": rope_freqs,
    }
    blocks: dict[str, object] = {}
    for il in range(n_all):
        nextn = il >= n_main
        # drafty model: trunk blocks nearly vanish (x ~ embedding), NextN blocks vanish further
        out_scale = (0.02 if nextn else draft_noise) if drafty else 1.0
        blocks.update(
            _block(
                rng,
                il,
                QTYPES[il % len(QTYPES)],
                H,
                head_dim,
                n_head[il],
                n_head_kv,
                n_ff,
                n_expert,
                n_ff_exp,
                n_ff_shexp,
                il in moe_layers,
                gate=il != n_all - 1,
                out_scale=out_scale,
            )
        )
        if nextn:
            blocks.update(_nextn(rng, il, il - n_main, H, n_vocab, emb, out_w, out_norm, drafty))
    if layout == "full":
        tensors = {**glob, **blocks}
    elif layout == "trunk":
        tensors = {**glob, **{k: v for k, v in blocks.items() if _blk(k) < n_main}}
    else:  # the MTP sidecar: NextN blocks + what their heads share with the trunk
        tensors = {k: v for k, v in glob.items() if k != "rope_freqs.weight"}
        tensors.update({k: v for k, v in blocks.items() if _blk(k) >= n_main})
    if edit is not None:
        edit(md, tensors)
    return write_gguf(path, "step35", md, tensors)


def _blk(name: str) -> int:
    return int(name.split(".")[1])


def _block(rng, il, q, H, D, hq, hkv, F, E, Fe, Fs, moe, gate, out_scale) -> dict:
    b = f"blk.{il}."
    t = {
        b + "attn_norm.weight": _norm(rng, H),
        b + "attn_q.weight": encode_tensor(_w(rng, hq * D, H, scale=0.15), q),
        b + "attn_k.weight": encode_tensor(_w(rng, hkv * D, H, scale=0.15), q),
        b + "attn_v.weight": encode_tensor(_w(rng, hkv * D, H), q),
        b + "attn_q_norm.weight": _norm(rng, D),
        b + "attn_k_norm.weight": _norm(rng, D),
        b + "attn_output.weight": encode_tensor(_w(rng, H, hq * D) * out_scale, q),
        b + "ffn_norm.weight": _norm(rng, H),
    }
    gw = _w(rng, hq, H, scale=0.2)
    if gate:
        t[b + "attn_gate.weight"] = encode_tensor(gw, q)
    if not moe:
        t[b + "ffn_gate.weight"] = encode_tensor(_w(rng, F, H, scale=0.15), q)
        t[b + "ffn_up.weight"] = encode_tensor(_w(rng, F, H, scale=0.15), q)
        t[b + "ffn_down.weight"] = encode_tensor(_w(rng, H, F) * out_scale, q)
        return t
    t[b + "ffn_gate_inp.weight"] = _w(rng, E, H, scale=0.15)  # router kept F32, as converted
    t[b + "exp_probs_b.bias"] = _w(rng, E, scale=0.3)
    t[b + "ffn_gate_exps.weight"] = encode_tensor(_w(rng, E, Fe, H, scale=0.15), q)
    t[b + "ffn_up_exps.weight"] = encode_tensor(_w(rng, E, Fe, H, scale=0.15), q)
    t[b + "ffn_down_exps.weight"] = encode_tensor(_w(rng, E, H, Fe) * out_scale, q)
    t[b + "ffn_gate_shexp.weight"] = encode_tensor(_w(rng, Fs, H, scale=0.15), q)
    t[b + "ffn_up_shexp.weight"] = encode_tensor(_w(rng, Fs, H, scale=0.15), q)
    t[b + "ffn_down_shexp.weight"] = encode_tensor(_w(rng, H, Fs) * out_scale, q)
    return t


def _nextn(rng, il, head, H, V, emb, out_w, out_norm, drafty) -> dict:
    b = f"blk.{il}.nextn."
    eh = _w(rng, H, 2 * H, scale=0.1)
    enorm, hnorm, shn = _norm(rng, H), _norm(rng, H), _norm(rng, H)
    own_head, own_embd = _w(rng, V, H), _w(rng, V, H, scale=1.0)
    if drafty:  # pass the token embedding straight through; the hidden half barely contributes
        eh[:, :H] = np.eye(H, dtype=np.float32)
        eh[:, H:] *= 0.02
        enorm, shn = np.ones(H, np.float32), out_norm
        own_head, own_embd = out_w, emb
    t = {
        b + "eh_proj.weight": encode_tensor(eh, QT.Q8_0),
        b + "enorm.weight": enorm,
        b + "hnorm.weight": hnorm,
        b + "shared_head_norm.weight": shn,
    }
    if head == 1:
        t[b + "shared_head_head.weight"] = encode_tensor(own_head, QT.Q8_0)
    if head == 2:
        t[b + "embed_tokens.weight"] = encode_tensor(own_embd, QT.Q8_0)
    return t
