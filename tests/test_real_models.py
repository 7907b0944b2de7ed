"""Both PyPI models against llama.cpp (references recorded by scripts/make_model_refs.py with
llama-cpp-python 0.3.36 on this machine kind; see the "producer" field of each JSON file).

Acceptance rule: greedy continuations identical to llama.cpp's up to the first step where
llama.cpp's own top-1/top-2 logit margin is below 0.35 (near-ties may legitimately flip); at the last
prompt position, the same top-1 unless llama.cpp's own margin there is below 0.35, KL(llama.cpp ||
ours) <= 0.02 per prompt and <= 0.01 on average over a model's prompts. Why not 0.01 per prompt:
both runtimes quantize every matmul's activations to 8 bits, which turns fp32 rounding differences
into ~0.5% perturbations; measured on SmolLM2's 38-token prompt, input noise of 1e-7 (relative) moves
the KL between 0.002 and 0.013 over 12 seeds, so one prompt's KL is a draw, their mean is not.
Gemma's long prompt (727 tokens) crosses its 512-token window.
"""

import json
from pathlib import Path

import pytest
import torch

from llmkit.core.decode.loop import generate
from llmkit.core.models.loader import load_model

DATA = Path(__file__).parent / "data"
MARGIN = 0.35
MAX_KL = 0.02  # one prompt
MAX_MEAN_KL = 0.01  # over a model's prompts


def _refs(arch):
    return json.loads((DATA / f"model_refs_{arch}.json").read_text())


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    torch.set_num_threads(2)
    return load_model(smollm_gguf)


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    torch.set_num_threads(2)
    return load_model(gemma_gguf)


def kl_from_top(case, logits):
    """KL(P || Q) over llama.cpp's top-N tokens plus one bucket for the rest of the vocabulary."""
    lq = logits.double().log_softmax(-1)
    top = torch.tensor(case["last_top_ids"])
    lp = torch.tensor(case["last_top_logprobs"], dtype=torch.float64)
    q = lq[top]
    p_tail, q_tail = case["last_tail_logmass"], torch.log1p(-q.exp().sum().clamp(max=1 - 1e-12))
    return float((lp.exp() * (lp - q)).sum() + torch.tensor(p_tail).exp() * (p_tail - q_tail))


def check_case(lm, case):
    prompt = case["prompt_ids"]
    with torch.inference_mode():
        cache = lm.new_cache(2048)
        first_logits = {}

        def greedy(logits, history):  # logits: the loop's host fp32 vector
            first_logits.setdefault("v", torch.from_numpy(logits))
            return int(logits.argmax())

        ours = list(generate(lm.model, cache, prompt, greedy, n_predict=len(case["greedy"])))
    kl = kl_from_top(case, first_logits["v"])
    lp = case["last_top_logprobs"]
    if lp[0] - lp[1] >= MARGIN:
        assert int(first_logits["v"].argmax()) == case["last_top_ids"][0], "last top-1 differs"
    assert kl <= MAX_KL, f"KL {kl:.4f} > {MAX_KL}"
    allowed = next((i for i, m in enumerate(case["margins"]) if m < MARGIN), len(case["greedy"]))
    for i in range(allowed):
        assert ours[i] == case["greedy"][i], (
            f"greedy token {i} differs ({ours[i]} vs llama.cpp {case['greedy'][i]}, llama.cpp margin "
            f"{case['margins'][i]:.3f}) for prompt {case['text'][:40]!r}"
        )
    return allowed, kl


def _check_model(lm, arch):
    refs = _refs(arch)
    assert lm.arch == refs["arch"] == arch
    checked, kls = zip(*(check_case(lm, c) for c in refs["cases"]), strict=True)
    assert sum(checked) >= 20  # the rule must actually compare a good number of tokens
    assert sum(kls) / len(kls) <= MAX_MEAN_KL, f"mean KL {sum(kls) / len(kls):.4f}"


def test_smollm2_matches_llama_cpp(smollm):
    _check_model(smollm, "llama")


def test_gemma3_matches_llama_cpp(gemma):
    _check_model(gemma, "gemma3")


def test_gemma3_long_prompt_crosses_window(gemma):
    case = _refs("gemma3")["cases"][-1]
    assert len(case["prompt_ids"]) > gemma.config.sliding_window
    assert check_case(gemma, case)[0] >= 16  # llama.cpp is confident here: most are compared


def test_prompt_tokenization_matches_llama_cpp(smollm, gemma):
    from llmkit.core.tokenizer import load_tokenizer

    for lm, arch in ((smollm, "llama"), (gemma, "gemma3")):
        tok = load_tokenizer(lm.metadata)
        for case in _refs(arch)["cases"]:
            assert (
                tok.encode(case["text"], add_special=True, parse_special=True) == case["prompt_ids"]
            )
