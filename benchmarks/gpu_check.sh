#!/usr/bin/env bash
# Every GPU check of twilight in one go, for a GPU session that gets a few minutes of a device:
#
#   1. the environment (GPU, driver, python, torch, triton; TVM is not needed and usually absent);
#   2. twilight imports without TVM (twilight itself is put on PYTHONPATH if not installed:
#      nothing is installed from a registry);
#   3. tests/gpu (pytest -m gpu): built-ins vs the reference on the GPU, kernels served from the
#      kernel cache with TWILIGHT_DISABLE_COMPILE=1 (AOT cubins, no JIT), the generated append
#      kernels, and a decode step captured in a CUDA graph and replayed;
#   4. benchmarks/gpu_bench.py: correctness, then Quest and Quest+Twilight against the fastest
#      torch SDPA at batch 8/64 x 10k/20k/30k, beside ALGORITHMS.md's published table.
#
# Everything lands under $OUT (default ./gpu_check_out): env.txt, imports.txt, tests_gpu.txt,
# tests_gpu.xml, gpu_bench.txt, gpu_bench.json, summary.txt. Each step has its own time limit
# and a failing step does not stop the next; the exit status is non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine (about 4-6 minutes)
#   bash benchmarks/gpu_check.sh --dry-run     # anywhere: says what it would run, checks the
#                                              # imports, collects the GPU tests and runs
#                                              # gpu_bench --dry-run under Triton's interpreter
#   bash benchmarks/gpu_check.sh --quick       # gpu_bench at batch 8, context 10k only
set -uo pipefail

DRY=0
BENCH_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --quick) BENCH_ARGS+=(--batches 8 --contexts 10000 --repeats 50) ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run, --quick)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
export OUT
PY="${PYTHON:-python3}"
FAILED=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}

: > "$OUT/summary.txt"
# twilight on the import path without pip: the repository root *is* the package
if ! "$PY" -c "import twilight" 2>/dev/null; then
  mkdir -p "$OUT/.pkg"
  ln -sfn "$ROOT" "$OUT/.pkg/twilight"
  export PYTHONPATH="$OUT/.pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
export TWILIGHT_CACHE_DIR="${TWILIGHT_CACHE_DIR:-$OUT/.twilight_cache}"
export TWILIGHT_TUNING_LOGS="${TWILIGHT_TUNING_LOGS:-$OUT/.tuning_logs}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for mod in ("torch", "triton", "numpy", "optuna", "rich", "pytest", "tvm"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report whatever is missing
        print(mod, "missing:", type(e).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step imports 120 "$PY" - <<'EOF'
import sys
sys.modules["tvm"] = None  # a GPU machine has no TVM: nothing on this path may need it
import twilight as tw
from twilight.compiler.triton import TritonBackend, export  # noqa: F401
from twilight.runtime.evaluation.measure import fastest_sdpa  # noqa: F401
from twilight.runtime.serving.load import DecodePipeline, load  # noqa: F401
print("twilight", tw.__file__, "imports without TVM")
EOF

if [ "$DRY" -eq 1 ]; then
  echo "dry run: on a GPU this runs"
  echo "  TRITON_INTERPRET=0 $PY -m pytest tests/gpu -m gpu   (limit 300s)"
  echo "  $PY benchmarks/gpu_bench.py ${BENCH_ARGS[*]:-}        (limit 420s)"
  step tests_gpu_collect 120 env TRITON_INTERPRET=0 "$PY" -m pytest tests/gpu -m gpu \
    --collect-only -q -p no:cacheprovider
  step gpu_bench 600 "$PY" benchmarks/gpu_bench.py --dry-run
else
  step tests_gpu 300 env TRITON_INTERPRET=0 "$PY" -m pytest tests/gpu -m gpu -q \
    -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml"
  step gpu_bench 420 "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}"
fi

if [ "${#FAILED[@]}" -eq 0 ]; then
  echo "gpu_check: all steps passed; results in $OUT" | tee -a "$OUT/summary.txt"
else
  echo "gpu_check: failed steps: ${FAILED[*]}; results in $OUT" | tee -a "$OUT/summary.txt"
  exit 1
fi
