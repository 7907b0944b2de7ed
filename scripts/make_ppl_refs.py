"""llama.cpp's perplexity of tests/data/ppl_text.txt on the real models (tests/data/ppl_refs.json).

llama-cpp-python exposes llama.cpp's logits, not the llama-perplexity tool, so this applies
llama-perplexity's procedure to llama.cpp's own logits: tokenize with BOS (parse_special off), chunks
of n_ctx tokens, first token of each chunk replaced by BOS when the vocab adds one, score the second
half. Run with a Python that has llama-cpp-python 0.3.36:
    /tmp/llvenv/bin/python scripts/make_ppl_refs.py ~/.cache/llmkit/models/*.gguf
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama, __version__

N_CTX = 512
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def ppl(path: str) -> dict:
    llm = Llama(
        model_path=path, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True, verbose=False
    )
    text = (DATA / "ppl_text.txt").read_text()
    add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else True
    tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    first, nll, nll2, n = N_CTX // 2, 0.0, 0.0, 0
    for i in range(len(tokens) // N_CTX):
        chunk = tokens[i * N_CTX : (i + 1) * N_CTX]
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        for j in range(first, N_CTX - 1):
            row = np.array(llm.scores[j], dtype=np.float64)
            lp = row[tokens[i * N_CTX + j + 1]] - np.logaddexp.reduce(row)
            nll -= lp
            nll2 += lp * lp
            n += 1
    mean = nll / n
    p = math.exp(mean)
    err = math.sqrt(max(nll2 / n - mean * mean, 0) / (n - 1)) * p
    return {
        "model": Path(path).name,
        "n_ctx": N_CTX,
        "n_tokens_text": len(tokens),
        "scored": n,
        "ppl": p,
        "ppl_error": err,
    }


if __name__ == "__main__":
    out = {
        "producer": f"llama-cpp-python {__version__} logits, llama-perplexity procedure, n_ctx {N_CTX}, "
        "n_threads 2, flash_attn off",
        "models": [ppl(p) for p in sys.argv[1:]],
    }
    (DATA / "ppl_refs.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
