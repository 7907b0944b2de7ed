"""Iteration order of llama.cpp's `token_to_id` map (a libstdc++ `std::unordered_map`).

llama.cpp auto-detects the EOT and FIM tokens by walking `token_to_id` and keeping the *first*
token whose text is in a list. When a vocabulary holds several candidates (SmolLM2 and Qwen have
both `<|endoftext|>` and `<|im_end|>`), which one wins depends on the hash map's iteration order.
We replay libstdc++: std::hash<std::string> (MurmurHash64A-style `_Hash_bytes`, seed 0xc70f6907),
the prime rehash policy, and the node insertion/rehash rules of `_Hashtable` for unique keys.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from llmkit.native_lib import load_library

_MASK = (1 << 64) - 1
_MUL = (0xC6A4A793 << 32) + 0x5BD1E995
_SEED = 0xC70F6907

# Bucket counts of an insert-only unordered_map: (number of elements that triggers, new count).
# Measured with libstdc++ (GCC 12); the policy only depends on the element count.
_GROWTH = [
    (1, 13), (14, 29), (30, 59), (60, 127), (128, 257), (258, 541), (542, 1109), (1110, 2357),
    (2358, 5087), (5088, 10273), (10274, 20753), (20754, 42043), (42044, 85229),
    (85230, 172933), (172934, 351061), (351062, 712697), (712698, 1447153),
    (1447154, 2938679), (2938680, 5967347),
]  # fmt: skip


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def stl_hash(data: bytes) -> int:
    """std::hash<std::string> of libstdc++ on 64-bit targets."""
    n = len(data)
    h = (_SEED ^ (n * _MUL)) & _MASK
    aligned = n & ~7
    for i in range(0, aligned, 8):
        k = int.from_bytes(data[i : i + 8], "little")
        k = (_shift_mix((k * _MUL) & _MASK) * _MUL) & _MASK
        h = ((h ^ k) * _MUL) & _MASK
    if n & 7:
        h = ((h ^ int.from_bytes(data[aligned:], "little")) * _MUL) & _MASK
    h = (_shift_mix(h) * _MUL) & _MASK
    return _shift_mix(h)


@functools.cache
def _native_order():
    """The library's llk_stl_map_order with its signature, or None."""
    fn = getattr(load_library()[0], "llk_stl_map_order", None)
    if fn is not None:
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        fn.restype, fn.argtypes = i64, [ctypes.c_char_p, i64, i64, vp, ctypes.c_int32, vp]
    return fn


def iteration_order(keys: list[str], native: bool = True) -> list[int] | None:
    """Indices of `keys` in the order an unordered_map filled with them (in order) iterates,
    natively (kernels/native/stlmap.c; SmolLM2's 49k tokens: 7 ms, 90 ms in Python) when the
    library is there and no key holds a NUL, else below.

    Returns None when the map would outgrow the measured bucket table.
    """
    n = len(keys)
    if n == 0:
        return []
    if n > _GROWTH[-1][1]:
        return None
    fn = _native_order() if native else None
    if fn is not None and not any("\0" in k for k in keys):
        texts = "\0".join(keys).encode("utf-8")
        order = np.empty(n, dtype=np.int32)
        growth = np.array(_GROWTH, dtype=np.int64)  # the one copy of the table
        if fn(texts, len(texts), n, growth.ctypes.data, len(_GROWTH), order.ctypes.data) == n:
            return order.tolist()
    hashes = [stl_hash(k.encode("utf-8")) for k in keys]
    head = -1  # first node of the singly linked node list
    nxt = [-1] * n
    # buckets[b] is the node *before* the first node of bucket b (-2 = before-begin), or None.
    buckets: list[int | None] = [None]
    bucket_count = 1
    growth = iter(_GROWTH)
    next_growth = next(growth)
    for i in range(n):
        if i + 1 == next_growth[0]:
            bucket_count = next_growth[1]
            head, buckets = _rehash(head, nxt, hashes, bucket_count)
            next_growth = next(growth, (n + 1, 0))
        b = hashes[i] % bucket_count
        before = buckets[b]
        if before is not None:  # insert at the front of its bucket's run
            if before == -2:
                nxt[i], head = head, i
            else:
                nxt[i], nxt[before] = nxt[before], i
        else:  # new bucket: the node goes to the very front of the list
            nxt[i], head = head, i
            if nxt[i] != -1:
                buckets[hashes[nxt[i]] % bucket_count] = i
            buckets[b] = -2
    order = []
    node = head
    while node != -1:
        order.append(node)
        node = nxt[node]
    return order


def _rehash(head: int, nxt: list[int], hashes: list[int], count: int):
    """libstdc++ `_M_rehash_aux` for unique keys: relink every node into `count` buckets."""
    buckets: list[int | None] = [None] * count
    new_head = -1
    first_bucket = 0  # bucket of the current first node
    node = head
    while node != -1:
        following = nxt[node]
        b = hashes[node] % count
        before = buckets[b]
        if before is None:
            nxt[node], new_head = new_head, node
            buckets[b] = -2
            if nxt[node] != -1:
                buckets[first_bucket] = node
            first_bucket = b
        elif before == -2:
            nxt[node], new_head = new_head, node
        else:
            nxt[node], nxt[before] = nxt[before], node
        node = following
    return new_head, buckets
