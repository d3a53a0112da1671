#!/usr/bin/env bash
# One call on the lent GPU machine: install what the image lacks, then run the GPU tests and benchmarks
# named by the arguments, each step's log under $OUT (or ./gpu-out). Usage: bash benchmarks/gpu_check.sh STEP...
#   tests      pytest -m gpu tests/gpu (or $TESTS)
#   kernels    benchmarks/kernels.py
#   matmul     the matmul GPU tests only
#   compile    compile $MODEL (default tinyllama-1.1b) with autotune into artifacts/
#   serve      verify it on cuda, time a 1-token run from process start, runtime bench
#   startup    where the time from process start to the first token goes
#   hf         HF transformers baseline on the same preset
#   decode     benchmarks/decode.py on artifacts/$MODEL (issue 8's protocol, HF in the same process, kernel profile)
#              in each launch mode of $MODES (default plain,pdl,async,pdl+async; the runtime's default is pdl+async)
#   prefill    benchmarks/prefill.py on artifacts/$MODEL (pp512/2048/8192, mixed-step stall test, prefix-cache TTFT)
#   serveload  `runtime serve` on artifacts/$MODEL, benchmarks/serve_load.py at 1/8/32 clients, `runtime bench` beside
#              (the GPU image has no uvicorn / fastapi: put their wheels in .whl/ first, e.g. `pip download -d .whl
#              --no-deps uvicorn fastapi starlette h11 prometheus-client ...`, and carry .whl to the machine)
#   quant      compile $MODEL with each --quant of $QUANT (int8), verify each on cuda, decode.py on all in one process
#   gemv       benchmarks/gemv.py over the pack's own GEMV candidates (every decode shape, T = 1, 4, 16, 32)
#   gemm       benchmarks/gemv.py over the prefill shapes (T = $GEMM_ROWS, default 128,512,2048), the wide tile space
#   attnprefill benchmarks/attention_prefill.py, every config against torch's SDPA
#   pdlbuilds  $MODEL built per PDL trigger of $PDL_BUILDS, verified on cuda, decode.py over all
#   moe        $MOE_MODEL (default qwen3-30b-a3b; mixtral-8x7b needs the x2 kind's disk) compiled straight from its
#              generator with --no-autotune --no-reference into the roomier of /tmp and . ($MOE_DIR overrides),
#              --quant int8 instead of bf16 when the disk cannot take the bf16 weights ($MOE_QUANT forces a scheme),
#              decode.py at batch 1 and 32 (no HF: a direct preset has no HF directory), the results rows printed;
#              the artifact removed afterwards unless KEEP=1. About 5-8 minutes on an H200 for Qwen3-30B-A3B
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
    tests) timeout "${TESTS_LIMIT:-300}" python3 -m pytest -q -rfEs --tb=line -m gpu ${TESTS:-tests/gpu} -n 8 \
        --junitxml="$OUT/gpu-junit.xml" > "$OUT/tests-full.log" 2>&1; tail -60 "$OUT/tests-full.log" ;;
    kernels) python3 benchmarks/kernels.py --out "$OUT/kernels.md" 2>&1 | tail -80 | tee "$OUT/kernels.log" ;;
    matmul) python3 -m pytest -q -m gpu tests/gpu/test_matmul_gpu.py -n 8 2>&1 | tail -30 | tee "$OUT/matmul.log" ;;
    compile)  # MODEL=tinyllama-1.1b by default; autotuned for this GPU
      t0=$(date +%s.%N)
      python3 -m compiler.cli compile "${MODEL:-tinyllama-1.1b}" --out "artifacts/${MODEL:-tinyllama-1.1b}" \
        ${COMPILE_ARGS:---autotune} \
        2>&1 | tail -80 | tee "$OUT/compile.log"
      echo "compile wall: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$OUT/compile.log"
      cp compiler/tuning_db.json "$OUT/tuning_db.json" ;;
    serve)
      A="artifacts/${MODEL:-tinyllama-1.1b}"
      python3 -m runtime.cli verify "$A" --backend cuda 2>&1 | tail -20 | tee "$OUT/verify.log"
      /usr/bin/time -f "run wall %e s" python3 -m runtime.cli run "$A" --prompt "Hello" --max-tokens 1 --backend cuda \
        2>&1 | tail -3 | tee "$OUT/first_token.log"
      python3 -m runtime.cli bench "$A" 2>&1 | tail -30 | tee "$OUT/bench.log" ;;
    startup) python3 -m benchmarks.startup "artifacts/${MODEL:-tinyllama-1.1b}" --backend cuda 2>&1 | tail -12 \
        | tee "$OUT/startup.log" ;;
    hf) python3 -m benchmarks.hf_baseline "${MODEL:-tinyllama-1.1b}" > "$OUT/hf.log" 2>&1; grep "tok/s" "$OUT/hf.log" || tail -20 "$OUT/hf.log" ;;
    decode) python3 -m benchmarks.decode "artifacts/${MODEL:-tinyllama-1.1b}" --out "$OUT/decode-${MODEL:-tinyllama-1.1b}.md" \
        --modes "${MODES:-plain,pdl,async,pdl+async}" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode-${MODEL:-tinyllama-1.1b}.log" ;;
    prefill) python3 -m benchmarks.prefill "artifacts/${MODEL:-tinyllama-1.1b}" --out "$OUT/prefill-${MODEL:-tinyllama-1.1b}.md" \
        2>&1 | tee "$OUT/prefill.log" ;;
    serveload)
      A="artifacts/${MODEL:-tinyllama-1.1b}"
      python3 -m runtime.cli serve "$A" --port 8011 > "$OUT/serve.log" 2>&1 &
      server=$!
      python3 -c "import httpx, time
for _ in range(120):
    try:
        if httpx.get('http://127.0.0.1:8011/health').status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(1)"
      python3 benchmarks/serve_load.py --url http://127.0.0.1:8011 --prompt-tokens 128 --max-tokens 256 \
        --clients 1 8 32 --time-limit 60 2>&1 | tail -30 | tee "$OUT/serve_load.log"
      kill "$server"; wait "$server"
      python3 -m runtime.cli bench "$A" --batch 1 --batch 8 --batch 32 --tg 256 2>&1 | tail -12 | tee -a "$OUT/serve_load.log" ;;
    quant)  # MODEL compiled again with each --quant of $QUANT (default "int8"; "int8 int4" for both) from the same
            # preset; every artifact verified on cuda, then all of them timed by decode.py in one process (issue 10's rows)
      A="artifacts/${MODEL:-tinyllama-1.1b}"; QS=()
      for q in ${QUANT:-int8}; do
        Q="$A-$q"; QS+=("$Q")
        python3 -m compiler.cli compile "${MODEL:-tinyllama-1.1b}" --out "$Q" --quant "$q" ${QUANT_ARGS:-} \
          ${COMPILE_ARGS:---autotune} 2>&1 | tail -5 | tee -a "$OUT/compile-quant.log"
        python3 -m runtime.cli verify "$Q" --backend cuda 2>&1 | tail -6 | tee -a "$OUT/verify-quant.log"
        du -sb "$Q"/weights.safetensors | tee -a "$OUT/verify-quant.log"
      done
      python3 -m benchmarks.decode "$A" "${QS[@]}" --batch "${BATCH:-1}" --no-hf --modes async --out "$OUT/quant-${MODEL:-tinyllama-1.1b}.md" \
        2>&1 | tee "$OUT/quant.log" ;;
    gemv) python3 benchmarks/gemv.py --out "$OUT" --space pack --pdl 2>&1 | grep -v "^  fail" | tail -40 ;;
    gemm) python3 benchmarks/gemv.py --out "$OUT/gemm" --rows "${GEMM_ROWS:-128,512,2048}" --space wide --pdl \
        --budget "${GEMM_BUDGET:-300}" 2>&1 | grep -v "^  fail" | tail -40 ;;
    attnprefill) python3 benchmarks/attention_prefill.py --out "$OUT/attention_prefill.md" 2>&1 | grep -v "^  [0-9a-z]" \
        | tail -30 ;;
    pdlbuilds)  # MODEL built once per PDL trigger of $PDL_BUILDS (TRILITE_PDL_TRIGGER values, default "2 1"), each
                # verified on cuda, then all timed by decode.py in one process, each in $MODES (default
                # pdl+async,async: PDL launches, the runtime's default, then the same binaries launched plainly)
      AS=()
      for b in ${PDL_BUILDS:-2 1}; do
        A="artifacts/${MODEL:-tinyllama-1.1b}-pdl$b"; AS+=("$A")
        t0=$(date +%s.%N)
        TRILITE_PDL_TRIGGER=$b python3 -m compiler.cli compile "${MODEL:-tinyllama-1.1b}" --out "$A" \
          ${COMPILE_ARGS:---no-autotune} 2>&1 | tail -3 | tee -a "$OUT/compile-pdl.log"
        echo "$A compile wall: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$OUT/compile-pdl.log"
        python3 -m runtime.cli verify "$A" --backend cuda 2>&1 | tail -3 | tee -a "$OUT/compile-pdl.log"
      done
      python3 -m benchmarks.decode "${AS[@]}" --no-hf --modes "${MODES:-pdl+async,async}" ${DECODE_ARGS:-} \
        --out "$OUT/pdl-${MODEL:-tinyllama-1.1b}.md" 2>&1 | tee "$OUT/pdl-${MODEL:-tinyllama-1.1b}.log" | grep "^|" ;;
    moe)
      M=${MOE_MODEL:-qwen3-30b-a3b}
      DIR=${MOE_DIR:-$(df --output=avail /tmp . | tail -2 | paste - - | awk '{print ($1 >= $2) ? "/tmp" : "."}')}
      need=$(python3 -c "import math
from compiler.frontends.presets import PRESETS
from compiler.frontends.random_model import parameter_shapes
print(sum(math.prod(s) for _, s, _ in parameter_shapes(PRESETS['$M'].random.config)) * 2 // 2**30 + 3)")
      avail=$(( $(df --output=avail "$DIR" | tail -1) / 1048576 ))
      Q=${MOE_QUANT:-$([ "$avail" -ge "$need" ] && echo none || echo int8)}
      echo "moe: $M, bf16 weights ${need} GiB with headroom, ${avail} GiB free in $DIR: --quant $Q" | tee "$OUT/moe.log"
      A="$DIR/moe-$M-$Q"
      t0=$(date +%s.%N)
      python3 -m compiler.cli compile "$M" --out "$A" --no-autotune --no-reference --quant "$Q" ${MOE_ARGS:-} 2>&1 \
        | tail -12 | tee -a "$OUT/moe.log"
      echo "compile wall: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$OUT/moe.log"
      du -sh "$A" | tee -a "$OUT/moe.log"
      timeout "${MOE_LIMIT:-420}" python3 -m benchmarks.decode "$A" --batch 1,32 --no-hf --modes pdl+async \
        --out "$OUT/moe-$M.md" 2>&1 | tee -a "$OUT/moe-decode.log" | grep -E "^\| (model|moe-)|MoE expert reads" \
        | tee -a "$OUT/moe.log"
      [ "${KEEP:-0}" = 1 ] || rm -rf "$A" ;;
    *) echo "unknown step $step" ;;
  esac
done
