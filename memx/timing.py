"""Wall-clock timing of compiled JAX calls: one rule for every benchmark and evaluation."""

import math
import statistics
import time

import jax


def median_time(fn, args, reps: int, budget_s: float = math.inf) -> float:
  """Median seconds of `reps` calls fn(*args) after one warm-up call, each ended by
  block_until_ready (asynchronous dispatch would otherwise time only the launch). Stops early
  once `budget_s` has passed and at least two calls were timed."""
  jax.block_until_ready(fn(*args))  # warm-up (and compile, for a jit'd fn)
  times, start = [], time.perf_counter()
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > budget_s and len(times) >= 2:
      break
  return statistics.median(times)
