"""Record llama.cpp's own tokenizations as references for tests/test_tokenizer.py.

Run with a Python that has llama-cpp-python (which bundles llama.cpp) and gguf-py:

    /work/llvenv/bin/python scripts/make_tokenizer_refs.py [--gemma PATH] [--smollm PATH]

For Gemma 3 270M (SPM) and SmolLM2 135M (BPE, pre 'smollm') and for variants of them, it writes
`tests/data/tokenizer_refs.json` with, per string of a fixed test suite: the token ids for each
(add_special, parse_special) combination, `llama_detokenize` bytes in several modes, plus vocab facts
(special ids, flags, EOG set, token attributes) and digests of every token's `llama_token_to_piece`.

Variants are vocab-only GGUF copies with a few metadata keys changed (e.g. `tokenizer.ggml.pre`),
which exercises llama.cpp's other pre-tokenizers and flags on a real vocabulary; the JSON stores the
changes so the test can apply the same ones to the original metadata.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import json
import platform
import random
import sys
import tempfile
from pathlib import Path

import llama_cpp
from gguf import GGUFReader, GGUFValueType, GGUFWriter

MODELS = Path.home() / ".cache" / "llmkit" / "models"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_refs.json"
SEED = 20240531
PIECE_BLOCK = 8192  # token ids per piece digest

# (name, base model, metadata overrides, full suite?)
VARIANTS = [
    ("gemma", "gemma", {}, True),
    ("smollm", "smollm", {}, True),
    ("gemma+space_prefix", "gemma", {"tokenizer.ggml.add_space_prefix": True}, False),
    ("gemma+eos+lstrip", "gemma", {"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.pre": "jina-v2-de"}, False),
    *[
        (f"smollm+pre={pre}", "smollm", {"tokenizer.ggml.pre": pre}, False)
        for pre in (
            "llama-bpe", "qwen2", "deepseek-v3", "default", "gpt-2", "deepseek-llm",
            "deepseek-coder", "falcon", "tekken", "gpt-4o", "chatglm-bpe", "poro-chat", "viking",
            "chameleon", "bailingmoe", "seed-coder", "starcoder", "command-r", "qwen35",
            "minicpm5", "laguna", "ufakzeka", "dbrx",
        )
    ],
    (
        "smollm+phi3-rstrip",
        "smollm",
        {"general.name": "Phi-3 mini (test)", "tokens": {"5": "</s>", "6": "<unk>", "7": "<s>"}},
        False,
    ),
]  # fmt: skip

COMBOS = {"full": [(True, True), (False, False), (True, False), (False, True)]}
COMBOS["short"] = [(True, True), (False, False)]
DETOK_MODES = [(False, False), (False, True), (True, True)]  # (remove_special, unparse_special)


def suite() -> list[str]:
    """The test strings: fixed categories, then random mixes from a fixed seed."""
    s: list[str] = []
    s += [" " * k for k in range(1, 21)] + ["\t" * k for k in range(1, 6)]
    s += [f"a{' ' * k}b" for k in range(1, 21)]
    s += [
        " \t ",
        "\t \t",
        " \n ",
        "  hello",
        "hello  ",
        " hello ",
        "\thello\t",
        "a \t b",
        "x\u00a0y",
    ]
    s += ["\n", "\n\n", "\n\n\n\n\n\n", "\r\n", "\r\n\r\n", "\r", "a\nb", "a\n\nb", "a\r\nb"]
    s += ["line1\nline2\n\n\nline3", " \n", "\n ", "  \n  ", "a \n\n b", "\n\t\n"]
    s += ["1", "12", "123", "1234", "123456789", "3.14159", "1,000,000", "2024-01-01", "v1.2.3"]
    s += ["0x1F", "1e-5", "١٢٣", "½", "Ⅻ", "x²", "007", "a1b2c3", " 42", "12 34  56"]
    s += ["!!!", "...", "?!", "---", "***", "(((", ")))", "[]{}<>", "@#$%^&*", "~~~", "```"]
    s += ["'''", '"""', "a.b,c;d:e", "hello, world!", "wait... what?!", " ! ", " .", "end ."]
    s += ["don't", "I'M", "we'll", "they're", "you've", "she'd", "it's", "DON'T", "I'm", "'s"]
    s += ["' s", " 's", "rock 'n' roll", "O'Neil", "Hello , world . How ' s it ?", "they 're"]
    s += ["café", "naïve", "Ångström", "résumé", "Crème brûlée", "cafe\u0301", "e\u0301\u0301"]
    s += [
        "Größenwahn über Straßen: Fußgänger müssen äußerst vorsichtig sein.",
        "L'été dernier, nous sommes allés à la plage où l'eau était très froide.",
        "Zażółć gęślą jaźń. Źdźbło trawy w Łodzi.",
        "¿Dónde está la biblioteca? ¡Aquí!",
        "Привет, как дела? Всё хорошо.",
        "Καλημέρα κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีครับ",
        "Tiếng Việt có dấu",
    ]
    s += [
        "中文",
        "日本語のテキスト",
        "한국어",
        "中文 English 混合",
        "東京タワーは333メートルです。",
    ]
    s += ["漢字かなカナ", "ＡＢＣ１２３", "，。、；：", "「引用」"]
    s += ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇩🇪", "❤️", "✨🚀 launch", "a😀b", "😀😀😀"]
    s += [
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        '#include <stdio.h>\n\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
        '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
        "<table><tr><td>x</td></tr></table>",
        "# Title\n\n* item one\n* item two\n\n> quote",
        "    indented 4",
        "\t\tdef f():\n\t\t\treturn None",
        "x = [i**2 for i in range(10) if i % 2 == 0]  # squares",
    ]
    s += [
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>user\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
        "<|im_start|>",
        "<|im_end|>",
        "<bos>",
        "<eos>",
        "<bos><bos>",
        "<pad>",
        "<unk>",
        "<mask>",
        "<unused0>",
        "<|endoftext|>",
        "a<|im_end|>b",
        "<|im_start|><|im_start|>",
        "<start_of_image>",
        "</s>",
        "<s>",
        "<0x41>",
        "<0x0A>",
        "<|im_end",
        "im_end|>",
        "<<|im_end|>>",
        "[multimodal]",
        "<eos >",
        "< eos>",
        " <eos> ",
        "hello   <mask>   world",
        "x <|im_end|>  y\n<|im_start|>\tz",
        "<unk> <s> </s>  <repo_name>  tail",
    ]
    s += ["", " ", "a", "\u00a0", "\u3000", "\u2028", "\x00", "\x1f", "\x7f", "\x85", "\x04\x06"]
    s += ["\u0301", "\u0301\u0302", "\ufffd", "\ufeff", "\u200b", "\u200d", "\U0001f9ff", "\ue000"]
    s += [
        "\U000f0000",
        "\uffff",
        "\U0010ffff",
        "\U0001e030",
        "a\U0001e030b",
        "\U00031350",
        "ǅ",
        "ß",
    ]
    s += ["İstanbul", "ﬁ", "\u212a\u2126", "\u1fbe\u1fd3\u1fdb\u1f7d", "\u0390\u03b9\u03a9K"]
    s += ["!\U0001e030!", " \U00016100x", "é\u0301!", "~x", "a~b~~c", "$+<=>^`|~"]
    s.append(
        "In 2023, the café on 5th Avenue served 1,234 croissants — an all-time high! "
        'Customers said: "C\'est magnifique" 😀. Meanwhile, 東京 saw rain (12.5 mm).\n\n'
        "    def main():\n        print('hello')\n\nTotal: $3.50 + tax; email me@example.com"
    )
    rng = random.Random(SEED)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" " * 12 + "\n" * 4 + "\t" * 2 + ".,;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~`")
        + list("éèàüöäßçñøåłźżąęœ")
        + list("中文日本語のテキスト한국어")
        + ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\u0301", "\u200d", "\u00a0", "\u3000", "\ufffd"]
        + ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<eos>", "<bos>"]
        + ["<|endoftext|>", "  ", "   ", "\n\n", "don't", "I'M", "<0x41>", "<mask>", "</s>"]
    )
    for _ in range(300):
        s.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return s


def document(seed: int) -> str:
    """A ~20 KB multilingual document to check long inputs token for token."""
    rng = random.Random(seed)
    words = (
        "the of and to in is that for it as was with be by on not he this are or his from at "
        "which but have an they you were her she there been one all we their café naïve über "
        "straße 東京 中文 日本 한국 😀 don't it's 1,000 3.14 2024 def return (x) [y] {z} <b> "
        "<start_of_turn> <|im_end|> \n \n\n \t".split(" ")
    )
    out, size = [], 0
    while size < 20_000:
        w = rng.choice(words) or " "
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def craft(src: Path, dst: Path, overrides: dict) -> None:
    """Vocab-only copy of a GGUF's tokenizer metadata with some keys replaced."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch=arch)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens" and "tokens" in overrides:
            value = list(value)
            for index, text in overrides["tokens"].items():
                value[int(index)] = text
        value = overrides.get(key, value)
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[1])
        else:
            writer.add_key_value(key, value, field.types[0])
    for key, value in overrides.items():  # keys the copy above did not write
        if key != "tokens" and not (key.startswith("tokenizer.") and key in reader.fields):
            vtype = GGUFValueType.BOOL if isinstance(value, bool) else GGUFValueType.STRING
            writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def piece(vocab, token_id: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, len(buf), 0, special)
    if n < 0:
        raise RuntimeError(f"piece of {token_id} longer than {len(buf)} bytes")
    return buf.raw[:n]


def detokenize(vocab, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    if n < 0:
        raise RuntimeError("detokenize buffer too small")
    return buf.raw[:n]


def vocab_facts(vocab) -> dict:
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    ids = {}
    for role in ("bos", "eos", "eot", "sep", "pad", "mask"):
        fn = getattr(llama_cpp, f"llama_vocab_{role}", None)
        if fn is not None:
            ids[role] = fn(vocab)
    for role in ("pre", "suf", "mid", "pad", "rep", "sep"):
        ids[f"fim_{role}"] = getattr(llama_cpp, f"llama_vocab_fim_{role}")(vocab)
    attrs = [llama_cpp.llama_vocab_get_attr(vocab, i) for i in range(n)]
    rle: list[list[int]] = []
    for i, a in enumerate(attrs):
        if rle and rle[-1][2] == a and rle[-1][0] + rle[-1][1] == i:
            rle[-1][1] += 1
        else:
            rle.append([i, 1, a])
    digests = {}
    for special in (False, True):
        blocks = []
        for start in range(0, n, PIECE_BLOCK):
            h = hashlib.sha256()
            for i in range(start, min(n, start + PIECE_BLOCK)):
                p = piece(vocab, i, special)
                h.update(len(p).to_bytes(4, "little") + p)
            blocks.append(h.hexdigest()[:16])
        digests["special" if special else "plain"] = blocks
    return {
        "n_vocab": n,
        "ids": {k: (None if v < 0 else v) for k, v in ids.items()},
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "attrs_rle": rle,
        "piece_digests": digests,
    }


def record(model_path: Path, strings: list[str], combos, indices: list[int], detok_modes) -> dict:
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    encode = {}
    for add_special, parse_special in combos:
        key = f"add_special={int(add_special)},parse_special={int(parse_special)}"
        encode[key] = [
            llm.tokenize(strings[i].encode("utf-8"), add_bos=add_special, special=parse_special)
            for i in indices
        ]
    base = encode["add_special=1,parse_special=1"]
    detok = {}
    for remove_special, unparse_special in detok_modes:
        key = f"remove_special={int(remove_special)},unparse_special={int(unparse_special)}"
        detok[key] = [detokenize(vocab, ids, remove_special, unparse_special).hex() for ids in base]
    return {"strings": indices, "encode": encode, "detokenize": detok, "facts": vocab_facts(vocab)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemma", type=Path, default=MODELS / "gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--smollm", type=Path, default=MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    bases = {"gemma": args.gemma, "smollm": args.smollm}
    strings = suite()
    docs = {"gemma": document(1), "smollm": document(2)}
    n_fixed = len(strings) - 300
    short = list(range(n_fixed)) + list(range(n_fixed, n_fixed + 60))
    out = {
        "generator": {
            "script": "scripts/make_tokenizer_refs.py",
            "llama_cpp_python": llama_cpp.__version__,
            "gguf_py": importlib.metadata.version("gguf"),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "calls": {
                "load": "llama_cpp.Llama(model_path=PATH, vocab_only=True, verbose=False)",
                "encode": "llm.tokenize(text.encode('utf-8'), add_bos=ADD_SPECIAL, "
                "special=PARSE_SPECIAL)  # llama_tokenize(add_special, parse_special)",
                "detokenize": "llama_cpp.llama_detokenize(vocab, ids, n, buf, size, REMOVE_SPECIAL, "
                "UNPARSE_SPECIAL) on the add_special=1,parse_special=1 ids (Llama.detokenize "
                "is not used: it concatenates 32-byte token_to_piece buffers and strips a space)",
                "pieces": "llama_cpp.llama_token_to_piece(vocab, id, buf, 1024, 0, SPECIAL), "
                f"sha256 over (u32 length + bytes) per block of {PIECE_BLOCK} ids, 16 hex digits",
                "attrs": "llama_cpp.llama_vocab_get_attr(vocab, id), run-length [start, count, attr]",
            },
        },
        "strings": strings,
        "documents": docs,
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, base, overrides, full in VARIANTS:
            path = bases[base]
            if overrides:
                path = Path(tmp) / f"{len(out['variants'])}.gguf"
                craft(bases[base], path, overrides)
            indices = list(range(len(strings))) if full else short
            # BPE variants only change pre-tokenizer and flags: one detokenize mode is enough there
            modes = DETOK_MODES if full or base == "gemma" else DETOK_MODES[:1]
            entry = record(path, strings, COMBOS["full" if full else "short"], indices, modes)
            entry.update(base=base, overrides=overrides)
            if full:
                llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
                entry["document_ids"] = llm.tokenize(
                    docs[base].encode("utf-8"), add_bos=True, special=True
                )
            out["variants"][name] = entry
            print(f"{name}: {len(indices)} strings", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, ensure_ascii=True, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
