#!/usr/bin/env bash
# One GPU lease, end to end: set up llmkit from the working tree (no network: gguf comes as a
# carried wheel in .whl/), run the Triton tests on the GPU, the kernel bandwidth benchmark and the
# decode benchmark of synthetic 1B models (Q4_K vs BF16 weights). Logs go to $OUT (or ./gpu_out).
#
#   bash scripts/gpu_session.sh [steps...]      steps: env tests tune bench e2e profile (default: env tests bench e2e)
#
# Each step has its own time limit so one hang cannot eat the lease.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
REPO=$PWD
export PYTHONUNBUFFERED=1
if ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/pkg && ln -sfn "$REPO" /tmp/pkg/llmkit
export PYTHONPATH=/tmp/pkg:/tmp/site:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m llmkit.cli.app "$@"\n' >/tmp/bin/llm
chmod +x /tmp/bin/llm && export PATH=/tmp/bin:$PATH
steps=${*:-env tests bench e2e}

for step in $steps; do
  echo "=== $step ($(date +%T))"
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      ;;
    tests)
      timeout 300 python3 -m pytest -q -rf -p no:cacheprovider tests/test_triton_kernels.py \
        tests/test_triton_backend.py tests/test_cuda_graph.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tests.log" | tail -25
      ;;
    tune)  # the best rows are used by the steps after this one
      timeout 300 python3 scripts/tune_triton_gemv.py ${TUNE_TYPES:+--types "$TUNE_TYPES"} \
        --json "$OUT/tune.json" --write-config "$OUT/gemv_config.json" 2>&1 |
        tee "$OUT/tune.log" | grep -v "^  [A-Z]"
      [ -s "$OUT/gemv_config.json" ] && export LLMKIT_TRITON_GEMV_CONFIG=$OUT/gemv_config.json
      ;;
    bench)
      timeout 200 python3 scripts/bench_triton.py 2>&1 | tee "$OUT/bench_triton.log"
      ;;
    e2e)
      mkdir -p /tmp/syn
      for t in Q4_K BF16; do
        [ -f /tmp/syn/syn-1b-$t.gguf ] ||
          timeout 200 python3 scripts/make_synthetic_model.py /tmp/syn/syn-1b-$t.gguf --type $t
      done
      timeout 60 llm run -m /tmp/syn/syn-1b-Q4_K.gguf --device cuda -p "the cat" -n 16 --temp 0 \
        2>&1 | tail -4
      timeout 300 llm bench -m /tmp/syn/syn-1b-Q4_K.gguf -m /tmp/syn/syn-1b-BF16.gguf \
        --device cuda -p 512 -n 128 -r 5 2>&1 | tee "$OUT/bench_e2e.log"
      echo "--- without CUDA graphs"
      LLMKIT_CUDA_GRAPHS=0 timeout 200 llm bench -m /tmp/syn/syn-1b-Q4_K.gguf --device cuda \
        -p 0 -n 64 -r 3 2>&1 | tee "$OUT/bench_e2e_eager.log"
      ;;
    profile)  # kernels per decode step and graph-replay time (scripts/profile_decode_step.py)
      mkdir -p /tmp/syn
      [ -f /tmp/syn/syn-1b-Q4_K.gguf ] ||
        timeout 200 python3 scripts/make_synthetic_model.py /tmp/syn/syn-1b-Q4_K.gguf --type Q4_K
      timeout 200 python3 scripts/profile_decode_step.py /tmp/syn/syn-1b-Q4_K.gguf 2>&1 |
        tee "$OUT/profile.log"
      ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done ($(date +%T))"
