"""Record llama.cpp reference outputs for the real-model tests (tests/data/model_refs_*.json).

Run with a Python that has llama-cpp-python (it builds llama.cpp from source, ~15-20 min on 2 cores):
    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/llvenv/bin/python scripts/make_model_refs.py ~/.cache/llmkit/models/*.gguf

For every prompt it stores llama.cpp's own token ids, then runs greedy decoding by taking the argmax of
llama.cpp's logits (what llama.cpp's greedy sampler does) for N_GEN steps, recording at each step the
chosen token and the top-1/top-2 logit margin, and for the last prompt position the log-probabilities
of the TOP_N most likely tokens plus the remaining mass (enough to compute KL(llama.cpp || ours)).
"""

import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama, __version__

N_GEN = 32
TOP_N = 4096

PROMPTS = {
    "llama": [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "def fibonacci(n):\n",
        "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ],
    "gemma3": [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "def fibonacci(n):\n",
        "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>user\nExplain why the sky is blue in two sentences.<end_of_turn>\n"
        "<start_of_turn>model\n",
    ],
}


def long_prompt() -> str:
    """> 512 tokens: a ledger whose early entries matter for the continuation."""
    names = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jia"]
    items = ["apples", "bolts", "candles", "drums", "eggs", "flutes", "gloves", "hammers", "inks"]
    lines = ["The market ledger of the town of Eldham, day by day:"]
    for day in range(1, 41):
        n, it = names[day % len(names)], items[(day * 7) % len(items)]
        lines.append(f"Day {day}: {n} sold {day * 3 % 17 + 2} {it} for {day * 11 % 50 + 5} coins.")
    lines.append("Summary: the merchant who sold the most on day 1 was")
    return "\n".join(lines)


def record(path: str) -> dict:
    llm = Llama(
        model_path=path, n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False
    )
    arch = llm.metadata.get("general.architecture")
    prompts = list(PROMPTS[arch])
    if arch == "gemma3":
        prompts.append(long_prompt())
    out = {
        "model": Path(path).name,
        "arch": arch,
        "producer": f"llama-cpp-python {__version__}, n_ctx 2048, n_batch 512, n_threads 2, "
        "flash_attn off, greedy = argmax of llama.cpp logits",
        "cases": [],
    }
    for text in prompts:
        llm.reset()
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        lp = last - np.logaddexp.reduce(last)
        top = np.argsort(-lp)[:TOP_N]
        tail = float(np.log1p(-min(np.exp(lp[top]).sum(), 1 - 1e-12)))
        gen, margins = [], []
        logits = last
        for _ in range(N_GEN):
            order = np.argsort(-logits)[:2]
            tok = int(order[0])
            gen.append(tok)
            margins.append(float(logits[order[0]] - logits[order[1]]))
            if llm.n_tokens >= 2040:
                break
            llm.eval([tok])
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        out["cases"].append(
            {
                "text": text,
                "prompt_ids": ids,
                "greedy": gen,
                "margins": [round(m, 4) for m in margins],
                "last_top_ids": top.tolist(),
                "last_top_logprobs": [round(float(x), 5) for x in lp[top]],
                "last_tail_logmass": tail,
                "detok": llm.detokenize(gen).decode("utf-8", errors="replace"),
            }
        )
        print(arch, len(ids), repr(out["cases"][-1]["detok"][:80]), file=sys.stderr)
    return out


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent / "tests" / "data"
    for p in sys.argv[1:]:
        ref = record(p)
        dst = here / f"model_refs_{ref['arch']}.json"
        dst.write_text(json.dumps(ref, indent=1))
        print("wrote", dst, file=sys.stderr)
