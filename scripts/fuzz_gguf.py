"""Fuzz the GGUF loading path: mutated headers of the tiny test models and of both real models.

    python scripts/fuzz_gguf.py [--cases 3000] [--seed 0] [--timeout 20] [--keep DIR]
                                [--bases tiny,real]

Each case mutates one base file (tests/gguf_fuzz.py: wrong value types, huge / zero / negative
counts, duplicate or missing keys, tokenizer arrays of the wrong kind, vocabulary shorter than the
embedding, out-of-range token ids, hostile chat templates, shape / type / offset / alignment lies,
smaller tensor types, versions, truncations, bad magic, byte flips) and opens it as `llm run`
does, in a forked child limited to `--timeout` seconds and 6 GiB of address space. The real
models' weights are a sparse hole of zeros (no disk, no copy). Prints the outcome counts and every
case that ended in an internal error, a hang or a memory blow-up; exits 1 if any did.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import gguf_fuzz as F  # noqa: E402


def bases(kinds: set[str], d: Path) -> list[tuple[str, Path, F.Parsed]]:
    out = []
    if "tiny" in kinds:
        from tiny_models import write_tiny_gemma3, write_tiny_llama
        from tiny_step35 import write_tiny_step35

        for name, writer in (("tiny-llama", write_tiny_llama), ("tiny-gemma3", write_tiny_gemma3),
                             ("tiny-step35", write_tiny_step35)):  # fmt: skip
            p = writer(d / f"{name}.gguf")
            out.append((name, p, F.parse(p, keep_data=True)))
    if "real" in kinds:
        from llmkit.core.model.catalog import ensure_gemma, ensure_smollm

        for name, ensure in (("smollm2", ensure_smollm), ("gemma3", ensure_gemma)):
            p = Path(ensure(quiet=True))
            out.append((name, p, F.parse(p, keep_data=False)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--bases", default="tiny,real")
    ap.add_argument("--keep", default=None, help="copy the failing cases' files here")
    ap.add_argument("--show-ok", action="store_true", help="also list the mutations that loaded")
    a = ap.parse_args()
    import llmkit.core.api  # noqa: F401  (imported once: every forked case starts warm)

    rng = random.Random(a.seed)
    counts, bad = collections.Counter(), []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base_list = bases(set(a.bases.split(",")), d)
        for i in range(a.cases):
            name, path, parsed = rng.choice(base_list)
            case = d / f"case{i}.gguf"
            what = F.make_case(rng, path, parsed, case)
            outcome, detail = F.run_case(str(case), a.timeout)
            counts[outcome] += 1
            if a.show_ok and outcome == "ok":
                print(f"ok: {name}: {what}", flush=True)
            if outcome in ("internal", "hang", "memory"):
                bad.append((i, name, what, outcome, detail))
                if a.keep:
                    Path(a.keep).mkdir(parents=True, exist_ok=True)
                    (Path(a.keep) / f"case{i}-{name}.gguf").write_bytes(case.read_bytes())
            case.unlink()
            if (i + 1) % 100 == 0:
                print(f"{i + 1} cases, {dict(counts)}, {time.time() - t0:.0f} s", flush=True)
    print(f"\n{a.cases} cases in {time.time() - t0:.0f} s: {dict(counts)}")
    for i, name, what, outcome, detail in bad:
        print(f"\ncase {i} ({name}: {what}) -> {outcome}\n  {detail.strip()[:1500]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
