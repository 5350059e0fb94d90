"""Timing of compiled JAX calls: one rule for every benchmark and evaluation.

median_time: host wall-clock of whole calls (launch + sync included); right for steps that run
for milliseconds. per_call_device_time: the device time of one call of a short kernel, where
launch and sync would dominate a wall-clock number. profile_kernel_times: where a call's device
time goes, kernel by kernel, from a profiler trace (GPU; empty elsewhere).
"""

import collections
import gzip
import json
import math
import pathlib
import statistics
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp


def median_time(fn, args, reps: int, budget_s: float = math.inf) -> float:
  """Median seconds of `reps` calls fn(*args) after one warm-up call, each ended by
  block_until_ready (asynchronous dispatch would otherwise time only the launch). Stops early
  once `budget_s` has passed and at least two calls were timed."""
  return interleaved_medians([fn], args, reps, budget_s)[0]


def feeding_back(fn, args, index: int, out_index: int):
  """A callable of no arguments for the timers: fn(*args), then args[index] = output[out_index]
  for the next call. How a step whose state is donated (a decode loop's cache) is timed: fed
  its own output, as the real loop does. Passing the same non-donated state to every call
  instead makes each call copy it whole (XLA cannot update an argument in place), a cost that
  grows with the state and that the real loop never pays."""
  args = list(args)

  def call():
    out = fn(*args)
    args[index] = out[out_index]
    return out
  return call


def interleaved_medians(fns, args, reps: int, budget_s: float = math.inf) -> list[float]:
  """Median seconds of fn(*args) for each fn, timed in alternation (one call of each per round,
  each ended by block_until_ready: asynchronous dispatch would otherwise time only the launch)
  after one warm-up call each (and compile, for a jit'd fn); stops after `budget_s` once two
  rounds are done."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  times, start = [[] for _ in fns], time.perf_counter()
  for _ in range(reps):
    for fn, ts in zip(fns, times, strict=True):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    if time.perf_counter() - start > budget_s and len(times[0]) >= 2:
      break
  return [statistics.median(ts) for ts in times]


def chained(fn, calls: int | None = None):
  """jit of arg_sets ↦ fn(*s) for s in arg_sets[:calls], in order, in one compiled program.

  Each call's arguments pass through an optimization_barrier together with the previous call's
  output, so XLA can neither merge two calls (CSE, even of equal inputs) nor hoist one out. The
  barriers are gone from the final program, so what keeps the calls one after another on a GPU
  is its single compute stream (kernels run in issue order); were independent kernels ever run
  concurrently, small ones could overlap and read too fast: check a new kernel family against
  the profiler once. Every output leaf passes a barrier too, and its first element goes into the
  one returned vector: no call is dead code, nothing sees through the barrier to shrink a call
  to that element, and the program has one output, not one per call (each output is a buffer
  the host allocates before the launch). The sets past `calls` are passed in unused
  (keep_unused), so programs over k and 2k of the same sets take the same arguments: the host
  cost of both before the launch is the same, and cancels in per_call_device_time."""

  def run(arg_sets):
    firsts, prev = [], None
    for args in arg_sets[:calls]:
      if prev is not None:
        args, _ = jax.lax.optimization_barrier((tuple(args), prev))
      prev = jax.lax.optimization_barrier(fn(*args))
      firsts += [leaf.ravel()[0].astype(jnp.float32) for leaf in jax.tree.leaves(prev)]
    return jnp.stack(firsts)

  return jax.jit(run, keep_unused=True)


def per_call_device_time(fn, arg_sets, reps: int, budget_s: float = math.inf) -> float:
  """Seconds of device time per call fn(*args), free of host dispatch and sync.

  `arg_sets` is a list of 2k argument tuples. Their buffers must not fit the device's cache
  (a GPU's L2) together, so every call reads its operands from memory as a real model's layers
  do, not from the cache a repeated call leaves warm: give each set its own copies, and use
  enough copies (a set may recur in the list to make more calls than copies). The calls run in
  one compiled program (`chained`); median_time times a program of calls on the first k sets
  and one on all 2k (both passed all 2k), and the result is (t_2k - t_k) / k, which cancels
  the dispatch, launch and sync cost both programs share. Host timing jitter (tens of µs) is
  divided by k: make k calls last a millisecond or more.

  The two programs are timed in alternation (`interleaved_medians`), so drift in clocks or
  load biases both alike; `budget_s` bounds that whole timing loop. Per-kernel host launch cost
  is not cancelled: a call of several tiny kernels (microseconds each) can be bounded by the
  host's launch rate, not the device.

  If noise makes t_2k <= t_k, returns t_2k / 2k instead (an upper bound: it includes the fixed
  cost) with a warning; use more sets or reps.

  Raises:
    ValueError: arg_sets is not a list or tuple of an even number >= 2 of argument tuples, or
      reps < 1 (checked before anything is compiled).
  """
  if not isinstance(arg_sets, (list, tuple)):
    raise ValueError(f"per_call_device_time: arg_sets must be a list of argument tuples, got "
                     f"{type(arg_sets).__name__}")
  n = len(arg_sets)
  if n < 2 or n % 2:
    raise ValueError(f"per_call_device_time: needs an even number >= 2 of argument sets (times "
                     f"the first half and the whole to cancel the fixed cost), got {n}")
  for i, args in enumerate(arg_sets):
    if not isinstance(args, (list, tuple)):
      raise ValueError(f"per_call_device_time: arg_sets[{i}] must be a tuple of arguments, got "
                       f"{type(args).__name__}")
  if not isinstance(reps, int) or reps < 1:
    raise ValueError(f"per_call_device_time: reps must be an int >= 1, got {reps!r}")
  k = n // 2
  sets = (list(arg_sets),)
  t_k, t_2k = interleaved_medians([chained(fn, k), chained(fn, n)], sets, reps, budget_s)
  if t_2k > t_k:
    return (t_2k - t_k) / k
  warnings.warn(f"per_call_device_time: {n} calls took no longer than {k} ({t_2k:.3g} s vs "
                f"{t_k:.3g} s; noise); returning the upper bound t_{n} / {n}", stacklevel=2)
  return t_2k / n


def _gpu_kernel_events(trace_dir: pathlib.Path) -> list[dict]:
  """The complete ('X') events on GPU streams of the newest perfetto trace JSON under a dir."""
  files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("perfetto*.json.gz"))
  if not files:
    return []
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]


def device_kernel_times(trace_dir: pathlib.Path) -> dict[str, float]:
  """Kernel name → total microseconds on GPU streams, from the perfetto trace JSON."""
  totals = collections.Counter()
  for e in _gpu_kernel_events(trace_dir):
    totals[e.get("name", "?")] += float(e.get("dur", 0.0))
  return dict(totals)


def device_kernel_hlo_ops(trace_dir: pathlib.Path) -> dict[str, list[str]]:
  """Kernel name → the HLO instructions it ran for (the events' `hlo_op` argument, where the
  trace has one), to find a kernel in the compiled HLO text: XLA names a kernel after the first
  of the identical fusions it serves, so one kernel name can stand for several instructions."""
  ops = collections.defaultdict(set)
  for e in _gpu_kernel_events(trace_dir):
    op = e.get("args", {}).get("hlo_op")
    if op:
      ops[e.get("name", "?")].add(str(op))
  return {k: sorted(v) for k, v in ops.items()}


def profile_kernel_times(fn, args, runs: int = 3) -> dict[str, float]:
  """Kernel name → mean device microseconds per call of fn(*args), from `runs` calls under
  `jax.profiler.trace` after one warm-up call. Empty where the trace has no GPU streams (CPU)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(runs):
        jax.block_until_ready(fn(*args))
    totals = device_kernel_times(pathlib.Path(tmp))
  return {k: v / runs for k, v in totals.items()}
