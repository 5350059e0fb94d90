#!/usr/bin/env bash
# All GPU checks in one call (GPU machine: run from the repo root with PYTHONPATH=.):
#   bash scripts/gpu_check.sh OUT_DIR
# Runs the `gpu`-marked tests, then the scripts/bench_*.py, and packs every log and result into
# OUT_DIR/gpu_check.tgz (re-packed after each step, so a killed run still returns what it did),
# with OUT_DIR/summary.txt beside it. (The device tool returns at most 8 files.)
#
# Knobs (environment):
#   GPU_CHECK_DEADLINE_S  stop starting benches after this many seconds (default 420; the
#                         first H200 call took ~45 s of tests and ~40-100 s per goal bench)
#   GPU_CHECK_TESTS=0     skip the tests
#   GPU_CHECK_TEST_PATHS  what the gpu tests collect (default tests/kernels)
#   GPU_CHECK_BENCHES     bench names to run, in order (default: the issues' goal benches first,
#                         then every other scripts/bench_*.py); NAME runs scripts/bench_NAME.py,
#                         a path ending in .py runs that script
#   ARGS_<script name>    replaces a script's arguments, e.g. ARGS_bench_ssm="--forms xla"
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/memx_gpu_check.XXXX")
export PYTHONPATH=${PYTHONPATH:-.}
export PYTHONUNBUFFERED=1
export MEMX_TEST_GPU=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-$(command -v python3 || command -v python)}
status=0

pack() {
  tar czf "$OUT/gpu_check.tgz.tmp" -C "$WORK" . && mv "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
  cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null || true
}
say() { echo "$@" | tee -a "$WORK/summary.txt"; }

{
  date -u; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || true
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" | tee -a "$WORK/summary.txt"

# Wheels carried from the CPU machine (scripts/fetch_gpu_wheels.sh): installed for this run only.
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --target "$WORK/site" .gpu_wheels/*.whl \
      > "$WORK/wheels.txt" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    say "wheels installed: $(ls .gpu_wheels | tr '\n' ' ')"
  else
    say "wheels: install failed (see wheels.txt)"
  fi
fi

if [ "${GPU_CHECK_TESTS:-1}" != "0" ]; then
  say "== gpu tests"
  extra=()
  # Compiles dominate and are CPU-bound: spread them over the machine's cores.
  # (-p no:benchmark: pytest-benchmark warns under xdist, and the suite turns warnings into errors)
  $PY -c "import pytest_benchmark" 2>/dev/null && extra+=(-p no:benchmark)
  $PY -c "import xdist" 2>/dev/null && extra+=(-n 8)
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 150)
  timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEs "${extra[@]}" \
    --continue-on-collection-errors ${GPU_CHECK_TEST_PATHS:-tests/kernels} \
    > "$WORK/gpu_tests.txt" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$WORK/gpu_tests.txt" | tail -40 | tee -a "$WORK/summary.txt"
  pack
fi

# Per-benchmark arguments, sized so the goal benches fit the first call.
bench_args() {
  local override="ARGS_$1"
  if [ -n "${!override+x}" ]; then echo "${!override}"; return; fi
  case "$1" in
    # The sweep's candidates (session 8) remove the dK/dV tile's register spill found offline
    # with ptxas; session 7's candidates, all slower than the defaults, are gone from it.
    bench_attention) echo "--budget-s 110 --profile --sweep" ;;
    # (session 8: the parallel SSD state pass against the sequential one, at the fla shape and
    # the 64k student's; xla's SSD was timed in session 7 and is left out to save the call.)
    # (session 10: the Pallas short conv against XLA's fused slices first, at the 64k student's
    # shape; the conv always times its xla baseline. Session 16: the scan before the SSD sweep,
    # so the 150 s budget cannot cut its associative-scan baseline.)
    bench_ssm) echo "--kinds conv,scan,ssd --forms pallas_gpu,assoc_scan,fla --ssd-shapes 1x16384,1x65536 --total-budget-s 150 --sweep --profile" ;;
    # The packed-matmul goal table first (per-call device time); decode and memory: 2nd call.
    bench_matmulfree) echo "--matmul" ;;
    bench_train) echo "--sizes gpu --repeats 2 --only 125m,350m" ;;
    bench_checkpoint) echo "--size gpu --repeats 1" ;;
    bench_distill) echo "--n-layers 4 --lengths 16384,65536,131072 --teacher-max 65536 --prefill-chunks whole,2048 --repeats 3 --budget-s 2" ;;
    bench_moa) echo "--size gpu --repeats 5 --equal-kv" ;;
    bench_remat) echo "--mixers attention,mamba2" ;;
    # (session 17: document masks move attention from cuDNN to the Pallas kernel.)
    bench_documents) echo "--size gpu --repeats 3 --models transformer,hybrid" ;;
    # (session 18: gradient accumulation at a fixed global batch, vocab 32000.)
    bench_microbatch) echo "--size gpu --counts 1,4 --vocab-blocks 0,4096 --repeats 2 --distill" ;;
    bench_optimizers) echo "--step-size gpu --repeats 2" ;;
    # (session 19: KIVI-quantized KV caches; the decode step dequantizes in XLA.)
    bench_kv_quant) echo "--size gpu --repeats 3" ;;
    # (session 21: LoRA / QLoRA state bytes, the NF4 matmul's Pallas kernel against the
    # chunked xla form and a bf16 matmul, and the fine-tuning step at the gpu size.)
    bench_lora) echo "--step-size gpu --repeats 3 --sizes 1.3b,7b" ;;
    # (session 22: speculative decoding's round parts at the gpu size, bf16, context 4096.)
    bench_speculative) echo "--size gpu --repeats 5" ;;
    # (session 23: local learning's step memory and time against backprop and remat.)
    bench_local) echo "--size gpu --repeats 2 --variants backprop,remat-full,G4-d1,G4-d1-MAN,G8-d0,G4-d1-nobarrier" ;;
    # (jax 0.11.2's XLA does not know --xla_gpu_enable_dot_strength_reduction: the profile of
    # the M = 1 projections without that rewrite needs a newer jaxlib on the GPU machine.)
    # The rerun without command buffers names each kernel's HLO op (session 9: inside a command
    # buffer the trace's hlo_op is only `command_buffer_1`).
    profile_model) echo "--models teacher,linear,matmulfree --prefill-length 65536 --xla-flags=--xla_gpu_enable_command_buffer=" ;;
    *) echo "" ;;
  esac
}
# A global deadline keeps the whole check inside the call however many benches exist: each gets
# at most 170 s and never more than what is left; the rest are listed as skipped.
DEADLINE=${GPU_CHECK_DEADLINE_S:-420}
# Order (session 10): the packed matmul's vector default at batch 1 (#7), the profile with
# kernel -> HLO op names (the 64k student, now with the Pallas short conv, #6), the conv and
# SSD sweeps with fla in the same run (#4), the 64k distillation prefill (#6's 5x goal),
# training 350m; then what session 9 measured (attention, MoA, checkpointing). The second call runs what is left, e.g.
#   GPU_CHECK_TESTS=0 GPU_CHECK_BENCHES="attention moa checkpoint" bash ...
FIRST=${GPU_CHECK_BENCHES:-"matmulfree scripts/profile_model.py ssm distill train attention moa checkpoint"}
ordered=""
for n in $FIRST; do
  case "$n" in
    *.py) if [ -f "$n" ]; then ordered="$ordered $n"; fi ;;
    *) if [ -f "scripts/bench_$n.py" ]; then ordered="$ordered scripts/bench_$n.py"; fi ;;
  esac
done
if [ -z "${GPU_CHECK_BENCHES:-}" ]; then
  for b in scripts/bench_*.py; do
    # bench_parallel measures CPU meshes (fake devices): on the GPU machine it only spends time.
    case "$b" in scripts/bench_parallel.py) continue ;; esac
    case " $ordered " in *" $b "*) ;; *) ordered="$ordered $b" ;; esac
  done
fi
for bench in $ordered; do
  name=$(basename "$bench" .py)
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then
    say "== $name: skipped (deadline: ${DEADLINE}s reached)"
    status=1
    continue
  fi
  limit=$((left < 170 ? left : 170))
  say "== $name (limit ${limit}s, started at ${SECONDS}s)"
  # shellcheck disable=SC2046
  timeout "$limit" $PY "$bench" --out "$WORK/$name" $(bench_args "$name") \
    > "$WORK/$name.txt" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then status=1; say "   exit $rc (124: time limit; see $name.txt)"; fi
  tail -12 "$WORK/$name.txt" | tee -a "$WORK/summary.txt"
  pack
done
say "== done at ${SECONDS}s, status $status"
pack
exit $status
