#!/usr/bin/env bash
# All GPU checks in one call (GPU machine: run from the repo root with PYTHONPATH=.):
#   bash scripts/gpu_check.sh OUT_DIR
# Runs the `gpu`-marked tests, then every scripts/bench_*.py, writing logs and results to OUT_DIR.
# Budget: under 8 minutes on one H100.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
export MEMX_TEST_GPU=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python}
status=0

{
  date -u; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== gpu tests"
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests \
  > "$OUT/gpu_tests.txt" 2>&1 || status=1
tail -5 "$OUT/gpu_tests.txt"

# Per-benchmark arguments and time limits sized so the whole check fits in 8 minutes.
bench_args() {
  case "$1" in
    bench_attention) echo "--budget-s 150" ;;
    bench_train) echo "--sizes gpu --repeats 2 --only 125m,350m" ;;
    bench_checkpoint) echo "--size gpu --repeats 1" ;;
    bench_distill) echo "--n-layers 4 --lengths 16384,65536,131072 --teacher-max 65536 --repeats 3 --budget-s 2" ;;
    bench_moa) echo "--size gpu --repeats 5" ;;
    bench_remat) echo "--mixers attention,mamba2" ;;
    *) echo "" ;;
  esac
}
# A global deadline keeps the whole check under 8 minutes however many benches exist: each gets
# at most 170 s and never more than what is left; the rest are listed as skipped.
DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
# The benches behind the issues' GPU goals run first, any other scripts/bench_*.py after them
# (GPU_CHECK_BENCHES="ssm moa" runs just those).
FIRST=${GPU_CHECK_BENCHES:-"attention ssm matmulfree moa distill checkpoint train"}
ordered=""
for n in $FIRST; do
  if [ -f "scripts/bench_$n.py" ]; then ordered="$ordered scripts/bench_$n.py"; fi
done
if [ -z "${GPU_CHECK_BENCHES:-}" ]; then
  for b in scripts/bench_*.py; do
    case " $ordered " in *" $b "*) ;; *) ordered="$ordered $b" ;; esac
  done
fi
for bench in $ordered; do
  name=$(basename "$bench" .py)
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped (deadline: ${DEADLINE}s reached)" | tee "$OUT/$name.txt"
    status=1
    continue
  fi
  limit=$((left < 170 ? left : 170))
  echo "== $name (limit ${limit}s)"
  # shellcheck disable=SC2046
  timeout "$limit" $PY "$bench" --out "$OUT/$name" $(bench_args "$name") \
    > "$OUT/$name.txt" 2>&1 || status=1
  tail -15 "$OUT/$name.txt"
done
exit $status
