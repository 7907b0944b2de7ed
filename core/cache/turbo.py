"""TurboQuant KV cache types `turbo3` / `turbo4` (the llama.cpp forks' "PolarQuant" variant:
no QJL residual; /work/shared/spec/GEMMA4_TURBOQUANT.md part 3).

Each head vector is split into groups of 128 values (64 when the head dimension is not a multiple
of 128, e.g. SmolLM2's 64). A group x is encoded as:
    n = |x|, u = x / n (0 when n <= 1e-10), y = R u with R = diag(s2) H diag(s1) / sqrt(g)
    (H the +-1 Sylvester-Hadamard matrix, s1 / s2 fixed +-1 vectors: a randomized Walsh-Hadamard
    rotation), idx_j = the Lloyd-Max centroid of y_j (thresholds at the midpoints; a tie goes to
    the higher index), n' = n / |c[idx]| (the corrected norm: the decoded group has norm n).
Stored per group: n' as fp16, then the codes. turbo4: 4-bit codes, the even element in the low
nibble: 2 + 64 = 66 bytes per 128 values. turbo3: 3-bit codes as 2 low bits (element j at bits
2 (j % 4) of byte j / 4) and 1 high bit (element j at bit j % 8 of byte j / 8): 2 + 32 + 16 = 50
bytes per 128 values. 64-groups take half the codes and the same 2-byte norm.

Attention reads the codes in place, in the rotated basis: `load` gives c[idx] * n' (a table
lookup, no inverse rotation); the query is rotated once (<R q, R k> = <q, k> per group), and since
sum_i a_i R v_i = R sum_i a_i v_i the attention output is un-rotated once (`attention`). The native
and Triton attention kernels do not read these types: the kernel table sends them to the torch
path (kernels/ops.py, `kv_attention_kernel`).

s1 / s2 come from torch's generator seeded with 42 (not the forks' tables: these caches are never
exchanged with llama.cpp, so bit-compatibility is not needed). The codebooks are the spec's: the
3-bit table for N(0, 1/128), and the 4-bit exact Gaussian Lloyd-Max table / sqrt(128) (the table
of the 66-byte fork); a 64-group scales them by sqrt(2) (the coordinates of a rotated unit vector
of dimension d have variance 1 / d).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import ops

_C3 = (0.021460, 0.065717, 0.117832, 0.190685)
_C4 = (0.011353, 0.034311, 0.058069, 0.083317, 0.111065, 0.143047, 0.182907, 0.241556)
TINY = 1e-10
ROW_INVARIANT = 16  # batches up to this many rows are computed row by row (see `attention`)


def _codebook(half: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor([-c for c in reversed(half)] + list(half), dtype=torch.float64)


@cache
def signs() -> tuple[torch.Tensor, torch.Tensor]:
    """s1, s2: the fixed +-1 vectors of the rotation (128 entries; a 64-group uses the first 64)."""
    gen = torch.Generator().manual_seed(42)
    s = torch.randint(0, 2, (2, 128), generator=gen).double() * 2 - 1
    return s[0], s[1]


@cache
def _rotation(g: int, device: str) -> torch.Tensor:
    """R [g, g] fp32 on `device`: y = R x."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < g:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)))
    s1, s2 = signs()
    R = s2[:g, None] * H * s1[None, :g] / math.sqrt(g)
    return R.float().to(device)


def group_size(dim: int) -> int:
    if dim % 128 == 0:
        return 128
    if dim % 64 == 0:
        return 64
    raise LlmkitError(f"turbo KV caches need a head dimension that is a multiple of 64 (got {dim})")


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """R (or R^T) applied to each group of the last dimension of x (fp32 out). Up to
    ROW_INVARIANT rows (decode steps, verify batches) each row is one fixed reduction, so a row
    rotates to the same bits alone or in a batch (what keeps speculative decoding lossless);
    longer batches (prefill chunks) use a matmul."""
    D = x.shape[-1]
    g = group_size(D)
    R = _rotation(g, str(x.device))
    R = R if inverse else R.T
    xg = x.float().reshape(*x.shape[:-1], D // g, g)
    if x.dim() > 1 and x.shape[0] <= ROW_INVARIANT:
        return (xg.unsqueeze(-1) * R).sum(-2).reshape(x.shape)
    return (xg @ R).reshape(x.shape)


class TurboType:
    """One turbo cache type: its code width, codebook and byte layout."""

    def __init__(self, name: str, bits: int, half: tuple[float, ...]):
        self.name, self.bits = name, bits
        self.centroids = _codebook(half)  # for g = 128, fp64
        self.mids = (self.centroids[1:] + self.centroids[:-1]) / 2
        self._luts: dict[tuple[int, str], torch.Tensor] = {}  # see lookup()

    def block_bytes(self, g: int) -> int:
        return 2 + g * self.bits // 8

    def row_bytes(self, dim: int) -> int:
        g = group_size(dim)
        return dim // g * self.block_bytes(g)

    def dim_of(self, row_bytes: int) -> int:
        """The head dimension of a stored row (the inverse of row_bytes)."""
        for g in (128, 64):
            if row_bytes % self.block_bytes(g) == 0:
                dim = row_bytes // self.block_bytes(g) * g
                if group_size(dim) == g:
                    return dim
        raise LlmkitError(f"{row_bytes} bytes are not a whole number of {self.name} groups")

    def table(self, g: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        s = math.sqrt(128 / g)
        return (self.centroids * s).float().to(device), (self.mids * s).float().to(device)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> uint8 codes [..., row_bytes(D)]."""
        D = x.shape[-1]
        g = group_size(D)
        c, mids = self.table(g, x.device)
        xg = x.float().reshape(*x.shape[:-1], D // g, g)
        n = xg.norm(dim=-1, keepdim=True)
        u = torch.where(n > TINY, xg / n.clamp_min(TINY), torch.zeros_like(xg))
        y = u @ _rotation(g, str(x.device)).T
        idx = torch.bucketize(y, mids, right=True)  # count of midpoints <= y: ties go up
        cn = c[idx].norm(dim=-1, keepdim=True)
        nc = torch.where(cn > TINY, n / cn.clamp_min(TINY), n)
        head = nc.half().view(torch.uint8)  # [..., G, 2]
        codes = idx.to(torch.uint8)
        if self.bits == 4:
            body = codes[..., 0::2] | (codes[..., 1::2] << 4)
        else:
            lo, hi = codes & 3, codes >> 2
            lo = lo.reshape(*lo.shape[:-1], g // 4, 4)
            lo = lo[..., 0] | (lo[..., 1] << 2) | (lo[..., 2] << 4) | (lo[..., 3] << 6)
            hi = hi.reshape(*hi.shape[:-1], g // 8, 8)
            hi = sum(hi[..., j] << j for j in range(8)).to(torch.uint8)
            body = torch.cat((lo, hi), -1)
        return torch.cat((head, body), -1).reshape(*x.shape[:-1], -1)

    def codes(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """uint8 rows [..., R] -> (centroid indices [..., G, g] int64, norms [..., G, 1], g)."""
        D = self.dim_of(q.shape[-1])
        g = group_size(D)
        b = q.reshape(*q.shape[:-1], D // g, self.block_bytes(g))
        norm = b[..., :2].contiguous().view(torch.float16).float()
        body = b[..., 2:].long()
        if self.bits == 4:
            idx = torch.stack((body & 15, body >> 4), -1).reshape(*body.shape[:-1], g)
        else:
            lo, hi = body[..., : g // 4], body[..., g // 4 :]
            lo = torch.stack([(lo >> (2 * j)) & 3 for j in range(4)], -1).reshape(*lo.shape[:-1], g)
            hi = torch.stack([(hi >> j) & 1 for j in range(8)], -1).reshape(*hi.shape[:-1], g)
            idx = lo | (hi << 2)
        return idx, norm, g

    def lookup(self, g: int, device) -> torch.Tensor:
        """The centroids each packed unit decodes to (`codes` in one table): turbo4 a byte ->
        its 2 elements [256, 2]; turbo3 a low byte + 256 * the high-bit nibble of the same 4
        elements -> those 4 elements [4096, 4]."""
        key = (g, str(device))
        if key not in self._luts:
            c, _ = self.table(g, device)
            u = torch.arange(256 if self.bits == 4 else 4096)
            if self.bits == 4:
                idx = torch.stack((u & 15, u >> 4), -1)
            else:
                lo, nib = u & 255, u >> 8
                idx = torch.stack([(lo >> 2 * j) & 3 | ((nib >> j) & 1) << 2 for j in range(4)], -1)
            self._luts[key] = c[idx.to(c.device)]
        return self._luts[key]

    def dequantize_rotated(self, q: torch.Tensor) -> torch.Tensor:
        """Codes -> c[idx] * n' [..., D] fp32 in the rotated basis (what attention reads): one
        table lookup per packed unit (`lookup`), the same values as indexing c by `codes`."""
        D = self.dim_of(q.shape[-1])
        g = group_size(D)
        b = q.reshape(*q.shape[:-1], D // g, self.block_bytes(g))
        norm = b[..., :2].contiguous().view(torch.float16).float()
        body = b[..., 2:]
        if self.bits == 4:
            key = body.int()
        else:  # element 4m + i: low bits in byte m, high bit at bit 4 (m % 2) + i of byte m // 2
            lo, hi = body[..., : g // 4], body[..., g // 4 :]
            nib = torch.stack((hi & 15, hi >> 4), -1).reshape(*hi.shape[:-1], g // 4)
            key = lo.int() | nib.int() << 8
        y = torch.nn.functional.embedding(key, self.lookup(g, q.device))
        y = y.reshape(*key.shape[:-1], g) * norm
        return y.reshape(*q.shape[:-1], -1)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Codes -> the decoded vectors in the original basis [..., D] fp32."""
        return rotate(self.dequantize_rotated(q), inverse=True)


TURBO_TYPES = {"turbo3": TurboType("turbo3", 3, _C3), "turbo4": TurboType("turbo4", 4, _C4)}


def is_turbo(kind: str) -> bool:
    return kind in TURBO_TYPES


def attention(q, K, V, mask, scale: float, type_k: str, type_v: str) -> torch.Tensor:
    """The torch attention over K / V as `load` returned them: turbo K is in the rotated basis,
    so the query is rotated once; turbo V gives the output in the rotated basis, un-rotated once.
    q [T, Hq, Dk] -> [T, Hq * Dv]. Small batches run row by row: on the torch path a row's bits
    then do not depend on the batch (a tree batch's mask rows are per row too)."""
    if not (is_turbo(type_k) or is_turbo(type_v)):
        return ops.attention_torch(q, K, V, mask, scale)
    if is_turbo(type_k):
        q = rotate(q)
    if 1 < q.shape[0] <= ROW_INVARIANT:  # row by row: a verify row computes a decode step's bits
        out = torch.cat([ops.attention_torch(q[i : i + 1], K, V, mask[i : i + 1], scale)
                         for i in range(q.shape[0])])  # fmt: skip
    else:
        out = ops.attention_torch(q, K, V, mask, scale)
    if is_turbo(type_v):
        T, Dv = q.shape[0], V.shape[-1]
        out = rotate(out.reshape(T, -1, Dv), inverse=True).reshape(T, -1).to(out.dtype)
    return out
