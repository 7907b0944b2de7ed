"""GGUF fuzzing: mutate a valid file's header (and sometimes its data) the way a hostile or broken
writer would, then open the result through the CLI's own loading path in a forked child with a
time and memory limit. Used by tests/test_fuzz_gguf.py (a seeded minute in CI) and
scripts/fuzz_gguf.py (long local runs).

Outcomes per case: "ok" (loaded and generated), "error" (a one-line LlmkitError: the only
acceptable failure), "internal" (any other exception: a bug), "hang" (over the time limit),
"memory" (over the address-space limit, or killed).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import traceback
from dataclasses import dataclass
from pathlib import Path

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}  # fmt: skip


@dataclass
class KV:
    key: str
    vtype: int
    raw: bytes  # the value's encoding (after the type field)


@dataclass
class TInfo:
    name: str
    ne: list[int]
    type_id: int
    offset: int


@dataclass
class Parsed:
    version: int
    kvs: list[KV]
    tensors: list[TInfo]
    data: bytes | None  # the data section (None: a sparse region of data_size bytes)
    data_size: int
    alignment: int


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _FMT:
        return pos + struct.calcsize(_FMT[vtype])
    if vtype == STR:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == ARR:
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _FMT:
            return pos + count * struct.calcsize(_FMT[itype])
        for _ in range(count):
            pos = _skip_value(buf, pos, itype)
        return pos
    raise ValueError(vtype)


def parse(path: Path, keep_data: bool) -> Parsed:
    """A valid file's header, with each value kept as raw bytes."""
    buf = Path(path).read_bytes() if keep_data else _head(path)
    version, n_t, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, kvs = 24, []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", buf, pos)
        end = _skip_value(buf, pos + 4, vtype)
        kvs.append(KV(key, vtype, buf[pos + 4 : end]))
        pos = end
    tensors = []
    for _ in range(n_t):
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", buf, pos)
        ne = list(struct.unpack_from(f"<{nd}Q", buf, pos + 4))
        type_id, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors.append(TInfo(name, ne, type_id, off))
    align = 32
    for kv in kvs:
        if kv.key == "general.alignment":
            (align,) = struct.unpack_from("<I", kv.raw)
    start = (pos + align - 1) // align * align
    size = os.path.getsize(path)
    data = buf[start:] if keep_data else None
    return Parsed(version, kvs, tensors, data, size - start, align)


def _head(path: Path, limit: int = 64 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def s_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def serialize(p: Parsed, out: Path, magic: bytes = b"GGUF") -> None:
    head = [magic, struct.pack("<IQQ", p.version, len(p.tensors), len(p.kvs))]
    for kv in p.kvs:
        head += [s_str(kv.key), struct.pack("<I", kv.vtype), kv.raw]
    for t in p.tensors:
        head += [s_str(t.name), struct.pack("<I", len(t.ne)), struct.pack(f"<{len(t.ne)}Q", *t.ne)]
        head.append(struct.pack("<IQ", t.type_id, t.offset))
    blob = b"".join(head)
    align = p.alignment if p.alignment > 0 and not p.alignment & (p.alignment - 1) else 32
    blob += b"\0" * (-len(blob) % align)
    with open(out, "wb") as f:
        f.write(blob)
        if p.data is not None:
            f.write(p.data)
        elif p.data_size > 0:  # the real models' weights as a sparse hole: zeros, no disk
            f.truncate(len(blob) + p.data_size)


# ---- values ----


def enc(vtype: int, value) -> bytes:
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == STR:
        return s_str(value)
    raise ValueError(vtype)


def enc_array(itype: int, values) -> bytes:
    body = b"".join(enc(itype, v) for v in values)
    return struct.pack("<IQ", itype, len(values)) + body


HOSTILE_TEMPLATES = [
    "{% for i in range(1000000000) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 1000000000 }}",
    "{{ 1 / 0 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ messages[0]['nope']['deeper'] }}",
    "{% for m in messages %}{{ m.content.__class__ }}{% endfor %}",
    "{{ raise_exception('hostile') }}",
    "{% if %}",
    "{{ ''.join(['x'] * 100000000) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}"
    "{% endfor %}{{ ns.l | length }}",
]


class Mutator:
    """One random mutation of a parsed header per call; `what` says what it did."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self, p: Parsed) -> str:
        ops = [self.retype, self.huge, self.zero, self.neg, self.dup_key, self.drop_key,
               self.tok_arrays, self.shape_lie, self.ttype, self.offset, self.align,
               self.template, self.version, self.shrink_type, self.vocab_short, self.token_ids,
               self.float_lie]  # fmt: skip
        return self.rng.choice(ops)(p)

    def _kv(self, p: Parsed, pred=lambda kv: True) -> KV | None:
        cands = [kv for kv in p.kvs if pred(kv)]
        return self.rng.choice(cands) if cands else None

    def retype(self, p):
        kv = self._kv(p)
        new = self.rng.choice([U32, I32, F32, STR, BOOL, F64, U8, ARR])
        if new == ARR:
            kv.vtype, kv.raw = ARR, enc_array(U32, [1, 2, 3])
        elif new == STR:
            kv.vtype, kv.raw = STR, s_str("garbage")
        elif new in (F32, F64):
            kv.vtype, kv.raw = new, enc(new, 2.5)
        else:
            kv.vtype, kv.raw = new, enc(new, 1)
        return f"retype {kv.key} -> {new}"

    def _num(self, p, value, vt=U32):
        kv = self._kv(p, lambda k: k.vtype in (U32, I32, U64, I64) and "token" not in k.key)
        if kv is None:
            return "no numeric key"
        kv.vtype, kv.raw = vt, enc(vt, value)
        return f"{kv.key} = {value}"

    def huge(self, p):
        return self._num(p, self.rng.choice([2**31, 2**32 - 1, 2**63 - 1, 10**12]), U64)

    def zero(self, p):
        return self._num(p, 0)

    def neg(self, p):
        return self._num(p, self.rng.choice([-1, -(2**31)]), I32)

    def float_lie(self, p):
        kv = self._kv(p, lambda k: k.vtype in (F32, F64))
        if kv is None:
            return "no float key"
        v = self.rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, -1e-30])
        kv.vtype, kv.raw = F32, enc(F32, v)
        return f"{kv.key} = {v}"

    def dup_key(self, p):
        kv = self._kv(p)
        p.kvs.insert(self.rng.randrange(len(p.kvs) + 1), KV(kv.key, kv.vtype, kv.raw))
        return f"duplicate {kv.key}"

    def drop_key(self, p):
        kv = self._kv(p)
        p.kvs.remove(kv)
        return f"drop {kv.key}"

    def tok_arrays(self, p):
        kv = self._kv(p, lambda k: k.key.startswith("tokenizer.ggml.") and k.vtype == ARR)
        if kv is None:
            return "no tokenizer array"
        choice = self.rng.randrange(3)
        if choice == 0:
            kv.raw = enc_array(U32, list(range(5)))
        elif choice == 1:
            kv.raw = enc_array(STR, ["a", "b c", "", "\xff"])
        else:
            kv.vtype, kv.raw = STR, s_str("not an array")
        return f"{kv.key} rewritten ({choice})"

    def vocab_short(self, p):
        for kv in p.kvs:
            if kv.key == "tokenizer.ggml.tokens":
                kv.raw = enc_array(STR, [f"t{i}" for i in range(self.rng.choice([1, 3, 40]))])
                return "short vocabulary"
        return "no tokens"

    def token_ids(self, p):
        kv = self._kv(p, lambda k: k.key.endswith("_token_id"))
        if kv is None:
            return "no token id"
        kv.vtype, kv.raw = U32, enc(U32, self.rng.choice([2**31, 10**9, 4294967295]))
        return f"{kv.key} out of range"

    def template(self, p):
        t = self.rng.choice(HOSTILE_TEMPLATES)
        p.kvs = [kv for kv in p.kvs if kv.key != "tokenizer.chat_template"]
        p.kvs.append(KV("tokenizer.chat_template", STR, s_str(t)))
        return f"template {t[:40]!r}"

    def shape_lie(self, p):
        t = self.rng.choice(p.tensors)
        i = self.rng.randrange(len(t.ne))
        t.ne[i] = self.rng.choice([0, 1, t.ne[i] * 2, t.ne[i] + 1, 2**40, 2**62])
        return f"shape of {t.name} -> {t.ne}"

    def ttype(self, p):
        t = self.rng.choice(p.tensors)
        t.type_id = self.rng.choice([4, 5, 31, 99, 2**31, 39, 41])
        return f"type of {t.name} -> {t.type_id}"

    def shrink_type(self, p):
        t = self.rng.choice([t for t in p.tensors if len(t.ne) >= 2] or p.tensors)
        t.type_id = self.rng.choice([2, 10, 16, 20])  # Q4_0 / Q2_K / IQ2_XXS-ish / IQ4_NL
        return f"type of {t.name} -> {t.type_id} (smaller)"

    def offset(self, p):
        t = self.rng.choice(p.tensors)
        other = self.rng.choice(p.tensors)
        t.offset = self.rng.choice([other.offset, t.offset + 1, t.offset + 3, 2**62, 0])
        return f"offset of {t.name} -> {t.offset}"

    def align(self, p):
        p.kvs = [kv for kv in p.kvs if kv.key != "general.alignment"]
        v = self.rng.choice([0, 3, 48, 1 << 40])
        vt = U64 if v >= 1 << 32 else U32
        p.kvs.append(KV("general.alignment", vt, enc(vt, v)))
        return f"alignment {v}"

    def version(self, p):
        p.version = self.rng.choice([0, 1, 2, 4, 2**31])
        return f"version {p.version}"


def mutate_bytes(rng: random.Random, path: Path, out: Path, header_len: int) -> str:
    """Raw byte-level damage: truncation, bad magic, flips inside the header."""
    size = os.path.getsize(path)
    kind = rng.randrange(3)
    with open(path, "rb") as f:
        head = bytearray(f.read(min(size, header_len + 64)))
    if kind == 0:
        cut = rng.randrange(0, min(size, header_len + 4096))
        with open(out, "wb") as f:
            f.write(bytes(head[:cut]) if cut <= len(head) else bytes(head))
        return f"truncated at {cut}"
    if kind == 1:
        head[:4] = rng.choice([b"GGUG", b"\0\0\0\0", b"FUGG"])
        what = "bad magic"
    else:
        for _ in range(rng.randint(1, 8)):
            head[rng.randrange(min(len(head), header_len))] ^= 1 << rng.randrange(8)
        what = "byte flips"
    with open(out, "wb") as f:
        f.write(head)
        f.truncate(size)
    return what


# ---- running a case ----


def open_like_cli(path: str) -> None:
    """What `llm run -m PATH -p ... -n 2` does, in process: load, tokenize, chat-render, generate."""
    from llmkit.core.api import LLM

    lm = LLM.load(path, n_ctx=64)
    lm.generate("Hello", n_predict=2, temp=0)
    lm.chat([{"role": "user", "content": "hi"}], n_predict=1, temp=0)
    lm.detokenize(list(range(min(8, lm.lm.config.n_vocab))))


def run_case(path: str, timeout_s: float = 20.0, mem_bytes: int = 6 << 30) -> tuple[str, str]:
    """(outcome, detail) of opening `path` in a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: limits, then the CLI path
        os.close(r)
        code, msg = 0, ""
        try:
            import torch

            # torch's OpenMP pool does not survive a fork of a parent that used it (a test run
            # after others): one thread, as torch's own DataLoader workers do
            torch.set_num_threads(1)
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
            open_like_cli(path)
            msg = "ok"
        except MemoryError:
            code, msg = 3, "MemoryError"
        except Exception as e:
            from llmkit.errors import LlmkitError

            if isinstance(e, LlmkitError):
                code, msg = 1, str(e)
            else:
                code, msg = 2, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        os.write(w, msg.encode("utf-8", "replace")[:8000])
        os.close(w)
        os._exit(code)
    os.close(w)
    chunks = []
    deadline = timeout_s
    import select
    import time

    t0 = time.monotonic()
    while True:
        left = deadline - (time.monotonic() - t0)
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "hang", f"over {timeout_s:.0f} s"
        ready, _, _ = select.select([r], [], [], min(left, 0.5))
        if ready:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    msg = b"".join(chunks).decode("utf-8", "replace")
    if os.WIFSIGNALED(status):
        return "memory", f"killed by signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return {0: "ok", 1: "error", 2: "internal", 3: "memory"}.get(code, "internal"), msg


def make_case(rng: random.Random, base: Path, parsed: Parsed, out: Path) -> str:
    """Write one mutated file from `base` to `out`; return what was done."""
    import copy

    if rng.random() < 0.15:
        return mutate_bytes(rng, base, out, header_len=_header_len(parsed))
    p = copy.deepcopy(parsed)
    what = [Mutator(rng)(p) for _ in range(rng.choice([1, 1, 1, 2]))]
    serialize(p, out)
    return "; ".join(what)


def _header_len(p: Parsed) -> int:
    return sum(len(kv.raw) + len(kv.key) + 12 for kv in p.kvs) + 24 + 64 * len(p.tensors)
