#!/usr/bin/env bash
# CI: the runtime-only install. A plain `pip install .` (no extras) must load and serve an artifact on a GPU, so in
# a venv with only the runtime's dependencies (no torch, no Triton): `runtime --help` and `runtime inspect` work, and
# every command that needs what is missing (a GPU here; torch and Triton for the CPU backends and the compiler) ends
# in one `error:` line, never an ImportError.
#
# Run with the full venv active (.ci/run): it compiles the tiny artifact the checks use. The runtime-only venv is
# .venv-runtime in the checkout, made anew each run and left there (its wheels come from pip's cache on the next run).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=$PWD/.venv-runtime

python -m compiler.cli compile tiny-llama --out "$work/tiny-llama" --target cuda:90 --dtype fp32 --no-autotune \
    --max-seq-len 64 --max-batch 4 --no-reference > "$work/compile.log" || { cat "$work/compile.log"; exit 1; }

python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q .
bin=$venv/bin
fail() { echo "runtime-only: $*" >&2; exit 1; }

site=$("$bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "runtime-only install: $(du -sh "$site" | cut -f1) in site-packages"
[ "$(du -sm "$site" | cut -f1)" -le 250 ] || fail "site-packages is over the 250 MB the README promises"

# Outside the checkout, so that only the installed packages can be imported.
cd "$work"
"$bin/python" - <<'EOF' || fail "the plain install pulled in a package of the compile extra"
import importlib.util, sys
from runtime.errors import COMPILE_EXTRA
found = [m for m in COMPILE_EXTRA if importlib.util.find_spec(m) is not None]
print("compile extra installed:", found or "none")
sys.exit(1 if found else 0)
EOF

"$bin/runtime" --help > /dev/null || fail "runtime --help failed"
"$bin/runtime" inspect tiny-llama > inspect.out || fail "runtime inspect failed"
grep -q "LlamaForCausalLM" inspect.out || fail "runtime inspect printed no model: $(cat inspect.out)"

# expect_error NEEDLE CMD...: CMD fails with one stderr line, "error: ..." containing NEEDLE, and no traceback.
expect_error() {
    local needle=$1 rc=0
    shift
    "$@" > /dev/null 2> err.out || rc=$?
    [ "$rc" -ne 0 ] || fail "'$*' succeeded, expected an error"
    [ "$(wc -l < err.out)" -eq 1 ] && grep -q "^error: .*$needle" err.out \
        || fail "'$*' (exit $rc) should print one 'error:' line with '$needle', printed: $(cat err.out)"
    echo "ok: $* -> $(cat err.out)"
}
expect_error "needs a CUDA GPU" "$bin/runtime" run tiny-llama --backend cuda --prompt hi
# serve imports the whole HTTP stack (uvicorn, fastapi, prometheus-client) before it loads the engine.
expect_error "needs a CUDA GPU" "$bin/runtime" serve tiny-llama --backend cuda --port 0
expect_error "needs a CUDA GPU" "$bin/runtime" bench tiny-llama --backend cuda
expect_error "needs a CUDA GPU" "$bin/runtime" verify tiny-llama --backend cuda
expect_error "trilite\[compile\]" "$bin/runtime" run tiny-llama --backend interpret --prompt hi --max-tokens 4
expect_error "trilite\[compile\]" "$bin/runtime" run tiny-llama --backend torch --prompt hi --max-tokens 4
expect_error "trilite\[compile\]" "$bin/compiler" compile tiny-llama --out again
echo "runtime-only checks passed in $((SECONDS - start)) s"
