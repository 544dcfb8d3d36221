#!/usr/bin/env bash
# The gpu tier on a CUDA machine that already has a CUDA torch and triton (no virtual environment,
# nothing downloaded): build scm_kernels._C in place with its CUDA kernels for this GPU's
# architecture, run every test that runs on CUDA (the triton-cuda and cuda backends, the CUDA-graph
# sampler), then the kernel benchmarks on CUDA. Logs and JUnit files go to $OUT (default ./gpu-out).
#
#   scripts/gpu_check.sh                 # build + tests + quick benchmarks
#   STAGES="build tests" scripts/gpu_check.sh
#   PYTEST_K="attention and triton-cuda" STAGES="tests" scripts/gpu_check.sh
#
# Each stage runs under its own time limit (seconds: BUILD_S, TESTS_S, CUDA_TESTS_S, BENCH_S) so that
# a hang in one still leaves the logs of the others.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build tests bench"}  # also: overhead tune
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

has() { [[ " $STAGES " == *" $1 "* ]]; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cc', torch.cuda.get_device_capability())"
  nproc
} 2>&1 | tee "$OUT/env.txt"

ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
build_pid=""
if has build; then
  # In the background: the triton-cuda tests need no extension and run meanwhile.
  ( TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      timeout "${BUILD_S:-240}" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    echo "build exit $?" >> "$OUT/build.log" ) &
  build_pid=$!
fi

PYTEST=($PY -m pytest -p no:cacheprovider -q -rfE --timeout=${TEST_TIMEOUT_S:-240})
if $PY -c "import xdist" 2>/dev/null; then PYTEST+=(-n "${WORKERS:-8}"); fi

# The CUDA-extension tests start as soon as the build is done, beside the triton-cuda tests.
cuda_pid=""
run_cuda_tests() {
  # (a sibling, not a child of this subshell: wait for the build's last line instead of its pid)
  while [[ -n "$build_pid" ]] && ! grep -q "^build exit" "$OUT/build.log" 2>/dev/null; do sleep 2; done
  timeout "${CUDA_TESTS_S:-240}" "${PYTEST[@]}" -k "${PYTEST_K2:-cuda and not triton-cuda}" \
    --junitxml="$OUT/cuda.xml" > "$OUT/tests_cuda.log" 2>&1
  echo "cuda tests exit $?" >> "$OUT/summary.txt"
}
if has tests; then
  run_cuda_tests &
  cuda_pid=$!
  timeout "${TESTS_S:-330}" "${PYTEST[@]}" -k "${PYTEST_K:-triton-cuda}" --junitxml="$OUT/triton_cuda.xml" \
    > "$OUT/tests_triton_cuda.log" 2>&1
  echo "triton-cuda tests exit $?" | tee -a "$OUT/summary.txt"
  tail -n 30 "$OUT/tests_triton_cuda.log"
  wait "$cuda_pid"
  tail -n 30 "$OUT/tests_cuda.log"
elif [[ -n "$build_pid" ]]; then
  wait "$build_pid"
fi
[[ -f "$OUT/build.log" ]] && tail -n 2 "$OUT/build.log" | tee -a "$OUT/summary.txt"

if has overhead; then
  timeout "${OVERHEAD_S:-90}" $PY -m benchmarks.gpu_overhead > "$OUT/overhead.log" 2>&1
  echo "overhead exit $?" | tee -a "$OUT/summary.txt"
  cat "$OUT/overhead.log"
fi

if has tune; then
  timeout "${TUNE_S:-200}" $PY -m benchmarks.tune_attention ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  echo "tune exit $?" | tee -a "$OUT/summary.txt"
  cat "$OUT/tune.log"
fi

if has bench; then
  timeout "${BENCH_S:-150}" $PY -m benchmarks.run --device cuda --quick --no-csv ${BENCH_ARGS:-} \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?" | tee -a "$OUT/summary.txt"
  grep -A 40 "TARGETS" "$OUT/bench.log" | tail -n 60
fi
cat "$OUT/summary.txt"
