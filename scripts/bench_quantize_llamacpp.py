"""`llm quantize` against llama.cpp's `llama_model_quantize`, type by type, on the same input.

    python scripts/bench_quantize_llamacpp.py F32.gguf [--lcpp-python /path/to/python]
                                              [--types Q4_0,...] [--repeat 2] [--threads 2]

Runs both interleaved (`--repeat` times per type), checks the two output files are byte-identical,
and prints per type the minimum of our CLI's own quantize time and of the library call, their
ratio, and the totals. llama.cpp runs in the Python that has `llama_cpp` (llama-cpp-python; a
separate venv is fine). The input should be F32 or F16 (a quantized input needs requantizing).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# llama.cpp's LLAMA_FTYPE_MOSTLY_* values
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
          "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
          "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}  # fmt: skip
COMMON = "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K,IQ4_NL"
LLAMA = """
import ctypes, sys, time, llama_cpp as L
p = L.llama_model_quantize_default_params()
p.nthread, p.ftype, p.allow_requantize = int(sys.argv[3]), int(sys.argv[4]), True
t0 = time.perf_counter()
rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
print(f"SECONDS {time.perf_counter() - t0:.4f}")
sys.exit(rc)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--lcpp-python", default=sys.executable)
    ap.add_argument("--types", default=COMMON)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llm = str(Path(sys.executable).with_name("llm"))
    ours_t, theirs_t, same = {}, {}, {}
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = Path(d) / "ours.gguf", Path(d) / "theirs.gguf"
        for t in a.types.split(","):
            for _ in range(a.repeat):
                p = subprocess.run([llm, "quantize", "-t", str(a.threads), a.input, str(ours), t],
                                   capture_output=True, text=True, check=True)  # fmt: skip
                s = float(re.search(rf"\({t}, ([\d.]+) s", p.stdout + p.stderr).group(1))
                ours_t[t] = min(ours_t.get(t, s), s)
                q = subprocess.run([a.lcpp_python, "-c", LLAMA, a.input, str(theirs),
                                    str(a.threads), str(FTYPES[t])],
                                   capture_output=True, text=True, check=True)  # fmt: skip
                s = float(re.search(r"SECONDS ([\d.]+)", q.stdout).group(1))
                theirs_t[t] = min(theirs_t.get(t, s), s)
                same[t] = ours.read_bytes() == theirs.read_bytes()
            print(f"{t:7s} llmkit {ours_t[t]:6.2f} s  llama.cpp {theirs_t[t]:6.2f} s  "
                  f"ratio {ours_t[t] / theirs_t[t]:5.2f}  bytes {'same' if same[t] else 'DIFFER'}",
                  flush=True)  # fmt: skip
    o, t = sum(ours_t.values()), sum(theirs_t.values())
    print(
        f"total   llmkit {o:6.2f} s  llama.cpp {t:6.2f} s  ratio {o / t:5.2f}  "
        f"identical {sum(same.values())}/{len(same)}"
    )
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
