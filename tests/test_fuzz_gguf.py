"""Mutated GGUF files through the CLI's loading path (tests/gguf_fuzz.py): every case ends in a
clean load or a one-line LlmkitError, never another exception, a hang or a memory blow-up. Seeded
and bounded in time (about 45 s); `scripts/fuzz_gguf.py --cases N` runs longer."""

from __future__ import annotations

import random
import time

import gguf_fuzz as F
import pytest

from tiny_models import write_tiny_gemma3, write_tiny_llama
from tiny_step35 import write_tiny_step35

BUDGET_S = 45.0


def _bases(tmp_path, real: list) -> list:
    out = []
    for name, writer in (("llama", write_tiny_llama), ("gemma3", write_tiny_gemma3),
                         ("step35", write_tiny_step35)):  # fmt: skip
        p = writer(tmp_path / f"{name}.gguf")
        out.append((name, p, F.parse(p, keep_data=True)))
    for p in real:
        out.append((p.name, p, F.parse(p, keep_data=False)))
    return out


def test_mutated_files_fail_cleanly(tmp_path, smollm_gguf, gemma_gguf):
    from pathlib import Path

    import llmkit.core.api  # noqa: F401  (loaded once; each forked case starts warm)

    bases = _bases(tmp_path, [Path(smollm_gguf), Path(gemma_gguf)])
    rng = random.Random(1234)
    bad, counts, t0, i = [], {}, time.monotonic(), 0
    while time.monotonic() - t0 < BUDGET_S:
        name, path, parsed = bases[i % len(bases)]  # every base in turn, mutations at random
        case = tmp_path / f"case{i}.gguf"
        what = F.make_case(rng, path, parsed, case)
        outcome, detail = F.run_case(str(case), timeout_s=20.0)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("ok", "error"):
            bad.append(f"{name}: {what} -> {outcome}: {detail[:600]}")
        case.unlink()
        i += 1
    assert not bad, "\n".join(bad)
    assert i >= 50, f"only {i} cases ran in {BUDGET_S} s: {counts}"
    assert counts.get("error", 0) > i // 3  # the mutations do reach the checks


@pytest.mark.parametrize("template", F.HOSTILE_TEMPLATES)
def test_hostile_chat_templates_fall_back(tmp_path, template):
    """A template that fails, loops, recurses or builds a huge value: `chat` still answers with
    the built-in format, and says so."""
    from llmkit.core.api import LLM

    def edit(md, tensors):
        md["tokenizer.chat_template"] = template

    p = write_tiny_llama(tmp_path / "t.gguf", edit=edit)
    lm = LLM.load(str(p), n_ctx=64)
    t0 = time.monotonic()
    ids = lm.chat_prompt([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10 and ids
    if lm.chat_format.source != "gguf":  # the file's template failed: fallback and a warning
        assert lm.warnings and "built-in" in lm.warnings[-1]
