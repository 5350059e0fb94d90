"""memx.timing.per_call_device_time: one program, no merged calls, checked input, sane result."""

import math
import time

import jax
import jax.numpy as jnp
import pytest

from memx import timing
from memx.timing import chained, per_call_device_time


def _dot(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _sets(n):
  x, w = jnp.ones((8, 64)), jnp.ones((64, 32))
  return [(x, w)] * n


def test_chained_keeps_one_dot_per_set():
  """Equal arguments, even the same traced values (the chain inlined into an outer jit), must
  not be merged into one dot by CSE, nor dropped as dead code."""
  x, w = _sets(1)[0]
  text = chained(_dot).lower(_sets(4)).compile().as_text()
  assert text.count(" dot(") == 4
  same = jax.jit(lambda x, w: chained(_dot)([(x, w)] * 6)).lower(x, w).compile().as_text()
  assert same.count(" dot(") == 6
  firsts = chained(_dot)(_sets(3))  # the first element of each call's output
  assert firsts.tolist() == [64.0] * 3
  short = chained(_dot, 2).lower(_sets(4)).compile().as_text()  # 4 sets passed, 2 calls made
  assert short.count(" dot(") == 2 and short.count("parameter(") >= 8


def test_per_call_device_time_is_positive_and_finite():
  # Calls of tens of ms each on CPU (2 GFLOP), four of them between the two programs, so the
  # difference stands well above the jitter of a shared, loaded machine (512 × 512 dots, 2
  # calls apart, once fell inside it under xdist: a noise warning, an error here).
  w = jnp.ones((1024, 1024))
  t = per_call_device_time(_dot, [(jnp.full((1024, 1024), i + 1.0), w) for i in range(8)],
                           reps=3)
  assert math.isfinite(t) and t > 0


def test_per_call_device_time_falls_back_on_noise(monkeypatch):
  """t_2k <= t_k (noise) gives the upper bound t_2k / 2k and a warning, not a negative time."""
  monkeypatch.setattr(timing, "interleaved_medians", lambda *a, **k: [3.0, 2.0])  # t_k, t_2k
  with pytest.warns(UserWarning, match="upper bound"):
    assert per_call_device_time(_dot, _sets(4), reps=1) == 2.0 / 4


@pytest.mark.parametrize("arg_sets,reps,match", [
    ([], 3, "even number"),
    (_sets(1), 3, "even number"),
    (_sets(3), 3, "even number"),
    ((jnp.ones(3), jnp.ones(3)), 3, r"arg_sets\[0\] must be a tuple"),  # arrays, not tuples
    ("ab", 3, "list of argument tuples"),
    (_sets(2), 0, "reps"),
])
def test_per_call_device_time_rejects_bad_input(arg_sets, reps, match):
  def fn(*_):  # never reached: the input is checked before anything is compiled
    raise AssertionError("fn called")
  with pytest.raises(ValueError, match=match):
    per_call_device_time(fn, arg_sets, reps=reps)


def test_interleaved_medians_alternate_and_stop_on_budget():
  """One call of each fn per round, in order; the budget ends the loop after two rounds."""
  calls = []

  def make(name, seconds):
    def fn():
      calls.append(name)
      time.sleep(seconds)
      return jnp.zeros(())
    return fn

  fast, slow = timing.interleaved_medians([make("a", 0.001), make("b", 0.004)], (), reps=5)
  assert calls == ["a", "b"] + ["a", "b"] * 5  # warm-ups, then alternating rounds
  assert 0.0005 < fast < slow
  calls.clear()
  timing.interleaved_medians([make("a", 0.002), make("b", 0.002)], (), reps=50, budget_s=0.0)
  assert calls == ["a", "b"] * 3  # warm-ups and the two rounds the budget still allows


def test_profile_kernel_times_averages_over_runs(monkeypatch):
  """One warm-up call, then `runs` traced calls; the trace's kernel totals come back per call."""
  calls = []
  monkeypatch.setattr(timing, "device_kernel_times", lambda _dir: {"gemm": 6.0, "fusion": 1.5})

  def fn(x):
    calls.append(1)
    return x + 1

  got = timing.profile_kernel_times(fn, (jnp.ones(3),), runs=3)
  assert got == {"gemm": 2.0, "fusion": 0.5}
  assert len(calls) == 4


def test_feeding_back_threads_a_donated_state_through_the_calls():
  import jax
  import jax.numpy as jnp

  from memx.timing import feeding_back, median_time

  step = jax.jit(lambda k, s: (k, s + k), donate_argnums=1)
  state = jnp.zeros((1024,))
  call = feeding_back(step, (jnp.float32(1.0), state), 1, 1)
  median_time(call, (), 3)   # one warm-up call + 3 timed: each reads the previous one's output
  out = call()
  assert float(out[1][0]) == 5.0
  # Donated: the compiled step updates the state in place (no copy of it per call).
  compiled = step.lower(jnp.float32(1.0), jnp.zeros((1024,))).compile()
  assert compiled.memory_analysis().alias_size_in_bytes == 1024 * 4
