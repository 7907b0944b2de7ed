"""Grammar-constrained decoding (llama.cpp's --grammar / --json-schema, OpenAI response_format).

The grammar engine is `llguidance` (Microsoft's Low-level Guidance, MIT licence), chosen over
xgrammar (Apache-2.0) and outlines-core (Apache-2.0) because:
  * it installs as one self-contained wheel (~3 MB, no Python dependencies), where xgrammar pulls
    in torch/transformers/triton/pydantic and outlines-core compiles a regex DFA per schema;
  * it takes llama.cpp's own GBNF (its `gbnf_to_lark` converter), Lark, regexes and JSON Schema,
    so `--grammar` files written for llama.cpp work unchanged (llama.cpp itself can use it);
  * its token mask is computed lazily per step with no per-schema precompilation (a schema costs
    microseconds to start), and a mask over a 262k vocabulary costs well under a millisecond.

The tokenizer bridge hands llguidance every token's bytes (control tokens marked with a leading
0xFF byte, as llguidance's llama.cpp bridge does, so grammar text never matches them) and the
vocabulary's end-of-generation ids: once the grammar is complete only those are allowed.

    c = Constraint(tokenizer, compile_grammar(json_schema={"type": "object"}))
    sample = ConstrainedSampler(Sampler(params), c)   # masks logits, advances the matcher
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from llmkit.core.decode.sampling import host
from llmkit.errors import LlmkitError

# JSON is generated compactly (no free whitespace: small models otherwise loop on newlines)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency
        raise LlmkitError(
            "grammars need the 'llguidance' package: pip install llguidance"
        ) from None
    return llguidance


def compile_grammar(
    gbnf: str | None = None,
    json_schema: dict | str | None = None,
    lark: str | None = None,
    json_object: bool = False,
) -> str:
    """One llguidance grammar from exactly one source: a GBNF text (llama.cpp), a JSON schema
    (dict or JSON text), a Lark text, or any JSON object. LlmkitError for a bad grammar."""
    given = [x for x in (gbnf, json_schema, lark) if x is not None] + ([1] if json_object else [])
    if len(given) != 1:
        raise LlmkitError("give one grammar: a GBNF grammar, a JSON schema or a Lark grammar")
    llg = _llg()
    if json_object:
        json_schema = {"type": "object"}
    if gbnf is not None:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        if not gbnf.strip():
            raise LlmkitError("the grammar is empty")
        try:
            lark = gbnf_to_lark(gbnf)
        except Exception as e:  # GbnfToLarkError and the converter's own asserts
            raise LlmkitError(f"invalid GBNF grammar: {_line(e)}") from None
    if lark is not None:
        grammar = llg.LLMatcher.grammar_from_lark(lark)
    else:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise LlmkitError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(json_schema, dict):
            raise LlmkitError("the JSON schema must be a JSON object")
        try:
            json_schema = closed(json_schema)
            grammar = llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise LlmkitError(f"invalid JSON schema: {_line(e)}") from None
    err = llg.LLMatcher.validate_grammar(grammar)
    if err:
        kind = "GBNF grammar" if gbnf is not None else "grammar" if lark else "JSON schema"
        raise LlmkitError(f"invalid {kind}: {_line(err)}")
    return grammar


def closed(schema):
    """llama.cpp's rule: an object schema that lists properties allows no others unless it says
    so (`additionalProperties` defaults to false: small models otherwise invent keys forever)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("const", "enum", "default", "examples") else v
           for k, v in schema.items()}  # fmt: skip
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _line(e) -> str:
    return " ".join(str(e).split())[:300]


class _Vocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer):
        from llmkit.core.tokenizer.vocab import ATTR_CONTROL, ATTR_USER_DEFINED

        self.tok = tokenizer
        attrs = tokenizer.vocab.attrs
        self.tokens = []
        for i in range(tokenizer.n_vocab):
            piece = tokenizer.token_to_piece(i, special=True)
            special = attrs[i] & ATTR_CONTROL or (
                attrs[i] & ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
            )
            self.tokens.append(b"\xff" + piece if special else piece)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t[:1] == b"\xff"]

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tok.encode(text, add_special=False, parse_special=False)


def token_bridge(tokenizer):
    """The llguidance tokenizer of one of our tokenizers (built once, ~1 s for 262k tokens)."""
    with _lock:
        bridge = _bridges.get(tokenizer)
        if bridge is None:
            llg = _llg()
            eog = sorted(tokenizer.eog_ids) or [tokenizer.eos_id]
            if eog == [None]:
                raise LlmkitError("grammars need a vocabulary with an end-of-generation token")
            bridge = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), eos_token=eog)
            _bridges[tokenizer] = bridge
        return bridge


class Constraint:
    """One generation's grammar state: the allowed-token mask of the next step, and the matcher
    advanced by every emitted token."""

    def __init__(self, tokenizer, grammar: str):
        llg = _llg()
        self.n_vocab = tokenizer.n_vocab
        self.matcher = llg.LLMatcher(token_bridge(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise LlmkitError(f"invalid grammar: {_line(self.matcher.get_error())}")
        self.words = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self.mask_seconds = 0.0  # time spent computing and applying masks
        self.steps = 0

    @property
    def done(self) -> bool:
        """The grammar is complete: only an end-of-generation token may follow."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Bool [n_vocab]: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error():
            raise LlmkitError(f"grammar: {_line(self.matcher.get_error())}")
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[: self.n_vocab]
        return bits.view(np.bool_)

    def apply(self, logits) -> np.ndarray:
        """`logits` [n_vocab (+ padding)] as a host fp32 vector (sampling.host) with every
        disallowed token at -inf (a new array)."""
        import time

        t0 = time.perf_counter()
        ok = self.allowed()
        if not ok.any():
            raise LlmkitError("grammar: no token can continue the output")
        x = host(logits)
        n = x.size
        keep = np.zeros(n, dtype=np.bool_)
        keep[: min(n, ok.size)] = ok[:n]
        out = np.where(keep, x, np.float32(-np.inf))
        self.mask_seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LlmkitError(f"grammar: token {token} was refused: {self.matcher.get_error()}")


class ConstrainedSampler:
    """`sample(logits, history)` through a grammar: mask, sample with the wrapped sampler (greedy
    or not, penalties included), advance the grammar. Plain decoding only (no draft methods)."""

    def __init__(self, sampler, constraint: Constraint):
        self.inner, self.constraint = sampler, constraint
        self.greedy = sampler.greedy

    def sample(self, logits, history: Sequence[int] = ()) -> int:
        tok = self.inner.sample(self.constraint.apply(logits), history)
        self.constraint.consume(tok)
        return tok

    __call__ = sample


def constrained(sampler, tokenizer, grammar: str, speculative: bool, ignore_eos: bool):
    """`sampler` wrapped by a fresh Constraint of `grammar`; LlmkitError for what cannot run
    constrained (MTP drafting, --ignore-eos)."""
    if speculative:
        raise LlmkitError("a grammar or JSON schema cannot be combined with --mtp")
    if ignore_eos:
        raise LlmkitError("a grammar or JSON schema cannot be combined with --ignore-eos")
    return ConstrainedSampler(sampler, Constraint(tokenizer, grammar))


def read_grammar(gbnf: str | None, gbnf_file, json_schema: str | None) -> str | None:
    """llama.cpp's --grammar / --grammar-file / -j --json-schema (at most one) -> a grammar."""
    given = [n for n, v in (("--grammar", gbnf), ("--grammar-file", gbnf_file),
                            ("--json-schema", json_schema)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise LlmkitError(f"give one of {', '.join(given)}, not several")
    if gbnf_file is not None:
        try:
            with open(gbnf_file, encoding="utf-8") as f:
                gbnf = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise LlmkitError(f"cannot read grammar file {gbnf_file}: {e}") from None
    if gbnf is not None:
        return compile_grammar(gbnf=gbnf)
    if json_schema is not None:
        return compile_grammar(json_schema=json_schema)
    return None
