"""The kernel table's small ops (norm, RoPE, attention, GLU) and the RoPE tables against naive
references."""

import math

import torch

from llmkit.kernels import rope as rope_tables
from llmkit.kernels.ops import attention_torch as attention
from llmkit.kernels.ops import rms_norm
from llmkit.kernels.ops import rope as apply_rope
from llmkit.kernels.rope import ROPE_NEOX, ROPE_NORM, rope_cache


def test_rms_norm():
    x, w = torch.randn(3, 10), torch.randn(10)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)


def _naive_rope(x, pos, n_rot, base, neox):
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(n_rot // 2):
            th = pos[t] * base ** (-2 * i / n_rot)
            a, b = (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)
            x0, x1 = x[t, :, a], x[t, :, b]
            out[t, :, a] = x0 * math.cos(th) - x1 * math.sin(th)
            out[t, :, b] = x0 * math.sin(th) + x1 * math.cos(th)
    return out


def test_rope_norm_and_neox_with_partial_rotation():
    x, pos = torch.randn(5, 3, 12), torch.tensor([0, 1, 7, 100, 513])
    for n_rot in (12, 8):
        cos, sin = rope_cache(pos, n_rot, 10000.0)
        for mode, neox in ((ROPE_NORM, False), (ROPE_NEOX, True)):
            got = apply_rope(x, cos, sin, mode)
            torch.testing.assert_close(
                got, _naive_rope(x, pos.tolist(), n_rot, 10000.0, neox), rtol=1e-5, atol=1e-5
            )


def test_attention_gqa_with_mask():
    T, Hq, Hkv, S, D = 3, 6, 2, 7, 8
    q, k, v = torch.randn(T, Hq, D), torch.randn(Hkv, S, D), torch.randn(Hkv, S, D)
    mask = torch.rand(T, S) > 0.3
    mask[:, 0] = True
    out = attention(q, k, v, mask, 0.5).view(T, Hq, D)
    for t in range(T):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            s = (k[kh] @ q[t, h]) * 0.5
            s[~mask[t]] = -math.inf
            torch.testing.assert_close(out[t, h], torch.softmax(s, 0) @ v[kh], rtol=1e-5, atol=1e-5)


def test_table_row_ops_match_the_torch_ops():
    """The kernel table's CPU row ops (native when built) compute the torch formulas."""
    from llmkit.kernels import torch_ops
    from llmkit.kernels.ops import gelu_tanh, glu, silu

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 40, generator=g), torch.rand(40)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))
    gu = torch.randn(2, 5, 2 * 24, generator=g)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(glu(gu, "silu"), silu(gate) * up)
    torch.testing.assert_close(glu(gu, "gelu_tanh"), gelu_tanh(gate) * up)


def test_rope_tables_key_factors_by_value_and_keep_outgrown_tables():
    """Factors with other values get their own table (not an address-reused stale one), and a
    table outgrown by a longer context stays alive: a captured CUDA graph may still read it."""
    f1, f2 = torch.full((4,), 1.0), torch.full((4,), 2.0)
    pos = torch.tensor([3])
    c1, _ = rope_cache(pos, 8, 777.0, 1.0, f1)
    c2, _ = rope_cache(pos, 8, 777.0, 1.0, f2)
    assert not torch.equal(c1, c2)
    n_retired = len(rope_tables._RETIRED_TABLES)
    rope_cache(torch.tensor([5000]), 8, 777.0, 1.0, f1)  # grows f1's table past 1024 rows
    assert len(rope_tables._RETIRED_TABLES) == n_retired + 1
    assert torch.equal(rope_cache(pos, 8, 777.0, 1.0, f1)[0], c1)


def test_rope_rows_of_consecutive_positions_equal_the_gathered_rows():
    """Few consecutive positions come back as views of the table (a decode step, a verify
    batch): the same values as gathering them, at the table's end and after it grows."""
    rope_cache(torch.tensor([0, 1]), 16, 5555.0)  # builds the 1024-row table
    for pos in ([7], [1022, 1023], [1023, 1024], [5, 6, 7, 8], [9, 3], [4, 4], [0, 2]):
        p = torch.tensor(pos)
        cos, sin = rope_cache(p, 16, 5555.0)
        full_cos, full_sin = rope_cache(torch.arange(2048), 16, 5555.0)
        assert torch.equal(cos, full_cos[p]) and torch.equal(sin, full_sin[p]), pos
