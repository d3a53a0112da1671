#!/usr/bin/env bash
# One call on the lent GPU machine: install what the image lacks, then run the GPU tests and benchmarks
# named by the arguments, each step's log under $OUT (or ./gpu-out). Usage: bash benchmarks/gpu_check.sh STEP...
#   tests      pytest -m gpu tests/gpu
#   kernels    benchmarks/kernels.py
#   tinyllama  compile tinyllama-1.1b with autotune, verify on cuda, bench, HF baseline
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1 TRILITE_CACHE=/tmp/trilite-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -m gpu tests/gpu -n 8 2>&1 | tail -60 | tee "$OUT/tests.log" ;;
    kernels) python3 benchmarks/kernels.py --out "$OUT/kernels.md" 2>&1 | tail -80 | tee "$OUT/kernels.log" ;;
    tinyllama)
      t0=$(date +%s.%N)
      python3 -m compiler.cli compile tinyllama-1.1b --out artifacts/tinyllama-1.1b --autotune 2>&1 | tail -60 \
        | tee "$OUT/compile.log"
      echo "compile wall: $(echo "$(date +%s.%N) - $t0" | bc) s" | tee -a "$OUT/compile.log"
      cp compiler/tuning_db.json "$OUT/tuning_db.json"
      python3 -m runtime.cli verify artifacts/tinyllama-1.1b --backend cuda 2>&1 | tail -20 | tee "$OUT/verify.log"
      python3 -m runtime.cli bench artifacts/tinyllama-1.1b 2>&1 | tail -30 | tee "$OUT/bench.log"
      python3 benchmarks/hf_baseline.py tinyllama-1.1b 2>&1 | tail -5 | tee "$OUT/hf.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
