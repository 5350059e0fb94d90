#!/usr/bin/env bash
# Run N `memx run` processes on this machine, wired together like N hosts on loopback.
#
#   scripts/launch_local.sh N [--devices K] [--port P] [--] memx-run-args...
#   scripts/launch_local.sh 2 experiments/demo/ablation.py:tiny --workdir runs/mh
#
# Process i runs `memx run ARGS --coordinator 127.0.0.1:P --num-processes N --process-id i` on
# the CPU with K fake devices of its own (default 1), gloo collectives between processes, its
# output prefixed with "[i] ". The script waits for all of them; when one fails it stops the
# others (SIGTERM, then SIGKILL after MEMX_LAUNCH_GRACE s, default 60) and exits with the first
# nonzero status; SIGINT/SIGTERM to the launcher stop them the same way before it exits. A
# dead peer is also caught by jax.distributed's heartbeat (MEMX_DIST_HEARTBEAT_TIMEOUT, 60 s).
#
# Environment: PYTHON (default .venv/bin/python when present, else python3), MEMX_LAUNCH_PORT.
# Use it to test multi-host code paths on one machine; real clusters use scripts/slurm/.
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -ge 1 ]] || usage
n=$1; shift
devices=1
port=${MEMX_LAUNCH_PORT:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    --devices) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
if [[ -z $port ]]; then  # a free port now; the coordinator binds it a moment later
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
# (The scheduler flag keeps collectives in one order on every device: memx/_xla_flags.py.)
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices --xla_cpu_enable_concurrency_optimized_scheduler=false"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

pids=()
grace=${MEMX_LAUNCH_GRACE:-60}
stop_all() {
  # SIGTERM to every memx process still running (under jax.distributed memx saves a checkpoint
  # at a step all processes agree on, then exits), then SIGKILL to any still alive after
  # $grace s. The pids are the Python processes themselves, not shells around them: their
  # output pipes stay open until they exit, so nothing they print is lost.
  local pid t
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  echo "launch_local: processes still running after ${grace}s; killing them" >&2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'stop_all; wait; exit 130' INT
trap 'stop_all; wait; exit 143' TERM

for ((i = 0; i < n; i++)); do
  # Each process: its stdout+stderr line-prefixed (the pid kept is Python's own).
  "$python" -u -m memx run "$@" --coordinator "127.0.0.1:$port" --num-processes "$n" \
    --process-id "$i" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

status=0
remaining=$n
while ((remaining > 0)); do
  wait -n "${pids[@]}" 2>/dev/null
  rc=$?
  if ((rc == 127)); then break; fi  # nothing left to wait for
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch_local: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
wait 2>/dev/null  # the output filters: every line is printed before the launcher exits
exit "$status"
