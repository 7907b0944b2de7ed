"""The llama-cpp-python-like Python object: `llmkit.load` / `llmkit.LLM`, OpenAI-shaped
completions (core/completions.py), streaming, stop strings, tokenize/detokenize, embed."""

import pytest
from smaps import mapped_rss_kib

import llmkit
from llmkit.core.completions import StopStrings
from llmkit.errors import LlmkitError
from tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("api") / "untied.gguf", tied=False)
    return llmkit.load(path, n_ctx=256)


def _text(out):
    return out["choices"][0]["text"]


def test_exports():
    from llmkit.core.api import LLM

    assert llmkit.LLM is LLM and callable(llmkit.load)
    with pytest.raises(AttributeError):
        llmkit.nothing_here  # noqa: B018


def test_completion_shape(lm):
    out = lm.create_completion("the cat", max_tokens=6, temperature=0)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"].endswith("untied.gguf")
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and choice["text"]
    u = out["usage"]
    assert u["prompt_tokens"] == len(lm.tokenize("the cat")) and u["completion_tokens"] == 6
    assert u["total_tokens"] == u["prompt_tokens"] + 6
    echoed = lm.create_completion("the cat", max_tokens=6, temperature=0, echo=True)
    assert _text(echoed) == "the cat" + choice["text"]


def test_streaming_joins_to_the_same_text(lm):
    for kw in ({}, {"echo": True}, {"stop": ["zz"]}):
        full = lm.create_completion("the dog", max_tokens=12, temperature=0, **kw)
        chunks = list(lm.create_completion("the dog", max_tokens=12, temperature=0, stream=True,
                                           **kw))  # fmt: skip
        assert len(chunks) > 2
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == _text(full)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]


def test_stop_strings(lm):
    full = _text(lm.create_completion("the mat", max_tokens=16, temperature=0))
    stop = full[5:8]
    want = full[: full.index(stop)]
    out = lm.create_completion("the mat", max_tokens=16, temperature=0, stop=[stop, "qqqq"])
    assert _text(out) == want and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 16
    chunks = lm.create_completion("the mat", max_tokens=16, temperature=0, stop=stop, stream=True)
    chunks = list(chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # stopping early keeps the cache consistent: the next call gives the full text again
    assert _text(lm.create_completion("the mat", max_tokens=16, temperature=0)) == full


def test_stop_string_split_across_pieces():
    s = StopStrings(["END", "xy"])
    out = "".join(s.put(p) for p in ["ab", "cE", "N", "Dzz"])
    assert out == "abc" and s.hit
    s = StopStrings("END")
    out = "".join(s.put(p) for p in ["aE", "Nb", "EN"]) + s.end()
    assert out == "aENbEN" and not s.hit  # held-back partial matches come out when they fail
    with pytest.raises(LlmkitError, match="stop must be"):
        StopStrings([3])


def test_chat_completion_shape_and_stream(lm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    out = lm.create_chat_completion(msgs, max_tokens=8, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == len(lm.chat_prompt(msgs))
    chunks = list(lm.create_chat_completion(msgs, max_tokens=8, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(d.get("content", "") for d in deltas) == choice["message"]["content"]
    with pytest.raises(LlmkitError, match="messages must be"):
        lm.create_chat_completion("hi")


def test_sampling_options(lm):
    a = lm.create_completion("the", max_tokens=10, temperature=1.5, top_k=0, top_p=1.0,
                             min_p=0.0, seed=7)  # fmt: skip
    b = lm.create_completion("the", max_tokens=10, temperature=1.5, top_k=0, top_p=1.0,
                             min_p=0.0, seed=7)  # fmt: skip
    assert _text(a) == _text(b)
    greedy = lm.create_completion("the", max_tokens=4, temperature=0)
    first = lm.stats.tokens[-4]  # the greedy run's first token
    banned = lm.create_completion("the", max_tokens=4, temperature=0, logit_bias={str(first): -100})
    assert _text(banned) != _text(greedy)
    with pytest.raises(LlmkitError, match="--top-p"):
        lm.create_completion("the", top_p=2.0)


def test_logprobs(lm):
    out = lm.create_completion("the cat", max_tokens=5, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == _text(out)
    for tok_lp, tops in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert tok_lp <= 0 and len(tops) <= 3
        assert max(tops.values()) == pytest.approx(tok_lp)  # greedy: the top token
    with pytest.raises(LlmkitError, match="logprobs must be"):
        lm.create_completion("x", logprobs=-1)


def test_tokenize_detokenize_roundtrip(lm):
    ids = lm.tokenize("the cat sat on the mat")
    assert ids[0] == lm.tokenizer.bos_id
    assert lm.tokenize("the cat sat on the mat", add_special=False) == ids[1:]
    assert lm.detokenize(lm.tokenize("the cat sat", add_special=False)).strip() == "the cat sat"


def test_interrupted_generation_leaves_a_usable_cache(lm, monkeypatch):
    ref = _text(lm.create_completion("the dog sat", max_tokens=10, temperature=0))
    model, calls = lm.lm.model, [0]
    forward = model.forward

    def interrupted(*a, **kw):
        calls[0] += 1
        if calls[0] == 4:  # mid-generation, inside a forward pass
            raise KeyboardInterrupt
        return forward(*a, **kw)

    monkeypatch.setattr(model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.create_completion("the dog sat on", max_tokens=10, temperature=0)
    assert lm.history == []
    assert _text(lm.create_completion("the dog sat", max_tokens=10, temperature=0)) == ref


def test_embed(lm):
    try:
        import llmkit.core.embed  # noqa: F401
    except ImportError:
        with pytest.raises(LlmkitError, match="embeddings are not available"):
            lm.embed("the cat")
        return
    one = lm.embed("the cat")
    two = lm.embed(["the cat", "the dog sat"])
    assert len(two) == 2 and len(one) == len(two[0]) == len(two[1])
    assert sum(v * v for v in one) == pytest.approx(1.0, rel=1e-4)
    assert one == pytest.approx(two[0], abs=1e-5)


@pytest.mark.slow
def test_real_model_by_name(smollm_gguf):
    lm = llmkit.load("smollm2-135m", n_ctx=512)
    out = lm.create_completion("The capital of France is", max_tokens=12, temperature=0)
    assert "Paris" in _text(out)
    chunks = lm.create_completion("The capital of France is", max_tokens=12, temperature=0,
                                  stream=True)  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in chunks) == _text(out)
    stopped = lm.create_completion("The capital of France is", max_tokens=12, temperature=0,
                                   stop=".")  # fmt: skip
    assert _text(stopped) == _text(out).split(".")[0]
    text = "Hello world, ünïcödé and 日本語!"
    assert lm.detokenize(lm.tokenize(text, add_special=False)) == text
    chat = lm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=8,
                                     temperature=0)  # fmt: skip
    assert chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize("runtime", ["lean", "torch"])
def test_n_threads_sets_the_native_pool_and_one_torch_thread(tmp_path, runtime):
    """n_threads: the native pool's threads; a torch model's torch gets one beside it."""
    import torch

    from llmkit.kernels import cpu_native

    if not cpu_native.available():
        pytest.skip("native library not built")
    before = torch.get_num_threads(), cpu_native.get_threads()
    try:
        torch.set_num_threads(2)
        path = str(write_tiny_llama(tmp_path / "t.gguf"))
        llmkit.load(path, n_ctx=64, n_threads=3, runtime=runtime)
        assert cpu_native.get_threads() == 3
        assert torch.get_num_threads() == (1 if runtime == "torch" else 2)
    finally:
        torch.set_num_threads(before[0])
        cpu_native.set_threads(before[1])


def test_no_mmap_reads_in_only_what_is_still_read_in_place(tmp_path):
    """use_mmap=False (--no-mmap) faults in the file's pages, but not those of the weights moved
    into x8 groups (their copies are already resident): with repack=False, the whole file."""
    import gc

    from llmkit.kernels import cpu_native

    path = write_tiny_llama(tmp_path / "wide.gguf", n_vocab=4096, n_embd=256, n_ff=512, tied=False)
    size_kib = path.stat().st_size // 1024
    rows = llmkit.load(path, n_ctx=64, use_mmap=False, repack=False)
    assert mapped_rss_kib(path) >= 0.9 * size_kib
    del rows
    gc.collect()  # its mapping of the same file goes with it
    packed = llmkit.load(path, n_ctx=64, use_mmap=False)
    moved = sum(src.nbytes for src, _ in packed.lm.backend.packed) // 1024
    if cpu_native.available() and moved:
        assert mapped_rss_kib(path) <= size_kib - 0.8 * moved


def test_load_time_counts_the_file_and_the_tokenizer(tmp_path, monkeypatch):
    """`load time` (llama.cpp's: file, vocabulary, weights) includes the tokenizer, which the
    API builds before the weights: a slow tokenizer shows in it."""
    import time

    from llmkit.core import api

    path = write_tiny_llama(tmp_path / "m.gguf")
    build = api.load_tokenizer

    def slow(metadata):
        time.sleep(0.3)
        return build(metadata)

    monkeypatch.setattr(api, "load_tokenizer", slow)
    assert llmkit.load(path, n_ctx=64).lm.load_seconds >= 0.3
