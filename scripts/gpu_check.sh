#!/usr/bin/env bash
# GPU check of imex-deq, under 8 minutes on one H100 (run from the repository root):
#
#   bash scripts/gpu_check.sh
#
# 1. installs the checkout (`pip install --no-deps -e .`; the machine already has JAX & co.),
# 2. runs the GPU-relevant tests (solvers, adjoints, mixed precision) at full float32 matmul
#    precision, with a time limit,
# 3. runs scripts/gpu_bench.py (CIFAR-small and CIFAR-large multiscale models, every variant,
#    batch 128) in the time that is left, printing the table and writing $OUT/gpu_table.md.
#
# Environment (all optional): OUT (results folder, default /tmp/imex_gpu_out), PYTHON,
# TOTAL_S (target wall-clock for everything, default 420), TEST_LIMIT_S (default 180),
# TESTS (pytest targets), BENCH_ARGS (extra gpu_bench.py arguments), SKIP_INSTALL=1.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
stamp() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - T0))s] $*"; }

OUT=${OUT:-/tmp/imex_gpu_out}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python}
TOTAL_S=${TOTAL_S:-420}
TEST_LIMIT_S=${TEST_LIMIT_S:-180}
TESTS=${TESTS:-tests/test_solvers.py tests/test_adjoint.py tests/test_precision.py}
BENCH_ARGS=${BENCH_ARGS:-}

stamp "install"
if [ -n "${SKIP_INSTALL:-}" ]; then
    stamp "SKIP_INSTALL set: not installing"
elif ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.txt" 2>&1 &&
    ! $PY -m pip install -q --no-deps -e . >>"$OUT/pip.txt" 2>&1; then
    tail -5 "$OUT/pip.txt"
    stamp "pip install failed; using PYTHONPATH instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax, equinox, optimistix, diffrax, lineax; print('jax', jax.__version__, \
'equinox', equinox.__version__, jax.devices())"

# Test workers share the GPU: no up-front 75% memory grab per process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
stamp "tests: $TESTS (limit ${TEST_LIMIT_S}s${XDIST:+, $XDIST})"
# shellcheck disable=SC2086
JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 10 "$TEST_LIMIT_S" \
    $PY -m pytest $TESTS -q -p no:cacheprovider $XDIST --durations=8 >"$OUT/gpu_tests.txt" 2>&1
TEST_RC=$?
tail -30 "$OUT/gpu_tests.txt"
if [ "$TEST_RC" = 124 ] || [ "$TEST_RC" = 137 ]; then
    stamp "tests: TIMED OUT after ${TEST_LIMIT_S}s"
else
    stamp "tests: exit status $TEST_RC"
fi

# The benchmark gets the rest of TOTAL_S (at least 120 s); a hard limit 30 s above its budget.
unset XLA_PYTHON_CLIENT_PREALLOCATE
BUDGET=$((TOTAL_S - ($(date +%s) - T0) - 20))
if [ "$BUDGET" -lt 120 ]; then BUDGET=120; fi
stamp "benchmark: budget ${BUDGET}s"
# shellcheck disable=SC2086
timeout -k 10 $((BUDGET + 30)) $PY scripts/gpu_bench.py --budget-s "$BUDGET" $BENCH_ARGS \
    2>&1 | tee "$OUT/gpu_bench.txt"
BENCH_RC=${PIPESTATUS[0]}
stamp "benchmark: exit status $BENCH_RC"
if [ -f "$OUT/gpu_table.md" ]; then
    if [ "$BENCH_RC" != 0 ]; then cat "$OUT/gpu_table.md"; fi
    stamp "table in $OUT/gpu_table.md"
fi
stamp "done (tests $TEST_RC, benchmark $BENCH_RC)"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
