"""The fast GGUF reader agrees with gguf-py's GGUFReader and rejects bad files with one line."""

import struct

import numpy as np
import pytest
from gguf import GGUFReader

from llmkit.core.gguf.reader import GGUFFile
from llmkit.errors import LlmkitError
from tiny_models import write_tiny_llama


def _same_as_reader(path):
    ours, ref = GGUFFile(path), GGUFReader(path)
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert o.type_id == int(t.tensor_type)
        assert o.shape == tuple(int(x) for x in reversed(t.shape))
        assert o.offset == t.data_offset and o.nbytes == t.n_bytes
        assert np.array_equal(
            ours.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)
        )
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        v, r = ours.metadata[key], field.contents()
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, np.asarray(r, dtype=v.dtype)), key
        elif isinstance(v, float):
            assert v == pytest.approx(r, rel=1e-6), key
        else:
            assert v == r, key


def test_agrees_with_gguf_reader_tiny(tmp_path):
    _same_as_reader(write_tiny_llama(tmp_path / "t.gguf"))


def test_agrees_with_gguf_reader_smollm(smollm_gguf):
    _same_as_reader(smollm_gguf)


def _bytes_of(tmp_path):
    return bytearray(write_tiny_llama(tmp_path / "t.gguf").read_bytes())


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda b: b[:3], "not a GGUF file"),
        (lambda b: b"GGML" + b[4:], "bad magic"),
        (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "unsupported GGUF version 7"),
        (lambda b: b[:8] + struct.pack("<Q", 1 << 60) + b[16:], "truncated or corrupt"),
        (lambda b: b[:16] + struct.pack("<Q", 1 << 60) + b[24:], "truncated or corrupt"),
        (lambda b: b[:24] + struct.pack("<Q", 1 << 62) + b[32:], "truncated or corrupt"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:200], "truncated or corrupt"),
    ],
)
def test_hostile_files_fail_with_one_line(tmp_path, mutate, msg):
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(mutate(_bytes_of(tmp_path))))
    with pytest.raises(LlmkitError, match=msg) as e:
        GGUFFile(p)
    assert "\n" not in str(e.value)


def test_unknown_tensor_type_is_named(tmp_path):
    b = _bytes_of(tmp_path)
    g = GGUFFile(tmp_path / "t.gguf")
    # patch the type field of the first tensor info to an unknown ggml type number
    name = next(iter(g.tensors)).encode()
    at = b.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", b, at)[0]
    b[at + 4 + 8 * n_dims : at + 8 + 8 * n_dims] = struct.pack("<I", 99)
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(b))
    with pytest.raises(LlmkitError, match="unknown ggml type 99"):
        GGUFFile(p)


def test_missing_file():
    with pytest.raises(LlmkitError, match="not found"):
        GGUFFile("/nonexistent/model.gguf")
