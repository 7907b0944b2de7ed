"""Grammar-constrained decoding (core/decode/grammar.py): grammars compile or fail with one clear
line, the mask admits exactly the grammar's tokens, generation through `llm run` flags follows
the grammar, and the mask costs well under a millisecond per token on both real vocabularies."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch

from llmkit.core.decode.grammar import Constraint, closed, compile_grammar, read_grammar
from llmkit.errors import LlmkitError


@pytest.fixture(scope="module")
def toks(smollm_gguf, gemma_gguf):
    from llmkit.core.gguf.reader import GGUFFile
    from llmkit.core.tokenizer import load_tokenizer

    return {n: load_tokenizer(GGUFFile(p).metadata) for n, p in
            (("smollm", smollm_gguf), ("gemma", gemma_gguf))}  # fmt: skip


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"gbnf": "root ::= ("}, "invalid GBNF grammar"),
        ({"gbnf": "  "}, "the grammar is empty"),
        ({"json_schema": "{nope"}, "not valid JSON"),
        ({"json_schema": "[1]"}, "must be a JSON object"),
        ({"json_schema": {"type": "object"}, "gbnf": 'root ::= "a"'}, "give one grammar"),
    ],
)
def test_bad_grammars(kw, msg):
    with pytest.raises(LlmkitError, match=msg):
        compile_grammar(**kw)


def test_read_grammar_flags(tmp_path):
    with pytest.raises(LlmkitError, match="not several"):
        read_grammar('root ::= "a"', None, "{}")
    with pytest.raises(LlmkitError, match="cannot read grammar file"):
        read_grammar(None, tmp_path / "missing.gbnf", None)
    (tmp_path / "g.gbnf").write_text('root ::= "a"')
    assert read_grammar(None, tmp_path / "g.gbnf", None)
    assert read_grammar(None, None, None) is None


def test_closed_objects():
    s = closed({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}})
    assert s["additionalProperties"] is False
    assert s["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed({"type": "object"})


@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_mask_follows_grammar_and_ends_with_eog(toks, name):
    """Random logits, greedy picks through the mask: the text is in the language, then only an
    end-of-generation token is allowed."""
    tok = toks[name]
    c = Constraint(tok, compile_grammar(gbnf='root ::= ("yes" | "no") "!"'))
    allowed = {tok.decode([int(i)]) for i in c.allowed().nonzero()[0]}
    assert allowed and allowed <= {"y", "ye", "yes", "n", "no", "yes!", "no!"}
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(10):
        t = int(c.apply(torch.randn(tok.n_vocab + 7, generator=g)).argmax())
        c.consume(t)
        if tok.is_eog(t):
            break
        out.append(t)
    assert tok.decode(out) in ("yes!", "no!") and c.done
    with pytest.raises(LlmkitError, match="refused"):
        c.consume(tok.encode("x", add_special=False)[0])


@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_mask_cost(toks, name):
    """The per-token cost of computing and applying the mask inside a JSON string (where nearly
    every token is allowed: the worst case). Reported; bounded loosely for a busy machine."""
    tok = toks[name]
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    c = Constraint(tok, compile_grammar(json_schema=schema))
    for t in tok.encode('{"s": "hello', add_special=False):
        c.consume(t)
    logits = torch.randn(tok.n_vocab)
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        c.apply(logits)
        best = min(best, time.perf_counter() - t0)
    print(f"\n{name} (vocab {tok.n_vocab}): mask {best * 1e3:.3f} ms/token")
    assert best < 0.02


def test_run_json_schema_validates(smollm_gguf):
    from llmkit.core.api import LLM, sampler_params

    llm = LLM.load(str(smollm_gguf), n_ctx=512)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}  # fmt: skip
    grammar = read_grammar(None, None, json.dumps(schema))
    for seed in range(3):
        params = sampler_params(temp=0.8, seed=seed)
        text = "".join(llm.stream(llm.tokenize("A person:"), params, 80, grammar=grammar))
        jsonschema.validate(json.loads(text), schema)
        assert llm.stats.stop_reason == "eog"
    with pytest.raises(LlmkitError, match="--ignore-eos"):
        list(llm.stream(llm.tokenize("x"), sampler_params(), 4, True, grammar=grammar))
