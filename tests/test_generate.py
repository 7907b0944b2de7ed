"""Generation loop: stops, limits, prompt chunking, context errors; chat templates; model cache."""

import pytest
import torch

from llmkit.core.decode.loop import GenStats, generate, prefill
from llmkit.core.model.catalog import resolve_model
from llmkit.core.models.loader import load_model
from llmkit.core.tokenizer.chat import CHATML, GEMMA, chat_template, render_chat
from llmkit.errors import LlmkitError
from tiny_models import write_tiny_gemma3


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(write_tiny_gemma3(tmp_path_factory.mktemp("g") / "g.gguf"))


def greedy(logits, history):
    return int(logits.argmax())


def test_n_predict_and_stats(lm):
    st = GenStats()
    out = list(generate(lm.model, lm.new_cache(64, margin=16), [1, 5, 6], greedy, 7, stats=st))
    assert len(out) == 7 == st.generated_tokens and st.tokens == out and st.stop_reason == "limit"
    assert st.prompt_tokens == 3


def test_stops_at_eog_unless_ignored(lm):
    first = list(generate(lm.model, lm.new_cache(64, margin=16), [1, 5, 6], greedy, 5))
    stop_at = first[-1]
    n_before = first.index(stop_at)
    st = GenStats()
    out = list(
        generate(
            lm.model,
            lm.new_cache(64, margin=16),
            [1, 5, 6],
            greedy,
            5,
            is_eog=lambda t: t == stop_at,
            stats=st,
        )
    )
    assert out == first[:n_before] and st.stop_reason == "eog"
    out = list(
        generate(
            lm.model,
            lm.new_cache(64, margin=16),
            [1, 5, 6],
            greedy,
            5,
            is_eog=lambda t: t == stop_at,
            ignore_eos=True,
        )
    )
    assert out == first


def test_chunked_prefill_equals_one_batch(tmp_path):
    # fp32 weights: on CPUs without native bf16 the kernel differs by batch size (bf16 GEMV vs fp32 GEMM)
    lm = load_model(write_tiny_gemma3(tmp_path / "g.gguf"), weight_dtype=torch.float32)
    ids = list(range(3, 40))
    a = prefill(lm.model, lm.new_cache(64, 64, "f32", "f32"), ids, n_ubatch=64)
    b = prefill(lm.model, lm.new_cache(64, 8, "f32", "f32"), ids, n_ubatch=5)  # ring of 16 wraps
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_context_limits(lm):
    with pytest.raises(LlmkitError, match="prompt is too long"):
        list(generate(lm.model, lm.new_cache(8, margin=8), list(range(9)), greedy, 1))
    st = GenStats()
    out = list(generate(lm.model, lm.new_cache(8, margin=8), [1, 2, 3], greedy, -1, stats=st))
    assert len(out) == 6 and st.stop_reason == "context full"  # 3 + 5 evaluated, the 6th sampled


def test_chat_templates():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(CHATML, msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(GEMMA, msgs, bos="<bos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert chat_template({"tokenizer.chat_template": "x"}, "llama") == ("x", "gguf")
    assert chat_template({}, "gemma3")[0] == GEMMA and chat_template({}, "llama")[0] == CHATML
    with pytest.raises(LlmkitError, match="chat template error: nope"):
        render_chat("{{ raise_exception('nope') }}", msgs)


def test_resolve_model(tmp_path):
    with pytest.raises(LlmkitError, match="model file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(LlmkitError, match="directory"):
        resolve_model(str(tmp_path))
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")
    assert resolve_model(str(p)) == p
