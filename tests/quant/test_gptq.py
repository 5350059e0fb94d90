"""GPTQ against a float64 NumPy transcription of the textbook algorithm (one row at a time, every
later row updated at once: no blocks, no lazy batches), its reduction to round-to-nearest when
the inputs are uncorrelated, and its error below RTN's on correlated inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import intq
from memx.quant.gptq import block_rows, gptq, hessian, output_error, rtn


def _numpy_gptq(w, h, bits, group, damp=0.01):
  w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
  k, n = w.shape
  maxq = 2 ** bits - 1
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h += damp * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
  codes = np.zeros((k, n), np.int64)
  scales, zeros = np.zeros((k // group, n)), np.zeros((k // group, n))
  for r in range(k):
    if r % group == 0:
      # the group's range widened to hold 0 (GPTQ's quantizer: 0 stays on the grid)
      lo = np.minimum(w[r:r + group].min(0), 0)
      hi = np.maximum(w[r:r + group].max(0), 0)
      s = (hi - lo) / maxq
      z = np.clip(np.round(-lo / s), 0, maxq)
      scales[r // group], zeros[r // group] = s, z
    s, z = scales[r // group], zeros[r // group]
    codes[r] = np.clip(np.round(w[r] / s) + z, 0, maxq)
    err = (w[r] - (codes[r] - z) * s) / u[r, r]
    w[r + 1:] -= np.outer(u[r, r + 1:], err)
  return codes, scales, zeros


def _data(k=256, n=48, rows=512, seed=0):
  """Correlated inputs (a random mixing of a few factors plus noise) and a weight matrix."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, 16)) @ rng.normal(size=(16, k)) + 0.3 * rng.normal(size=(rows, k))
  w = rng.normal(size=(k, n)) * 0.05
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize(("bits", "group"), [(4, 64), (3, 128), (2, 32)])
def test_matches_the_textbook_algorithm(bits, group):
  x, w = _data()
  h = hessian(x)
  codes, scales, zeros = gptq(w, h, bits=bits, group_size=group)
  want_codes, want_scales, want_zeros = _numpy_gptq(np.asarray(w), np.asarray(h), bits, group)
  # float32 against float64: a handful of codes sit on a rounding boundary
  assert np.mean(np.asarray(codes) == want_codes) > 0.995
  np.testing.assert_allclose(scales, want_scales, rtol=2e-3)
  w_hat = intq.dequantize(codes, scales, zeros, group)
  want_hat = (want_codes - np.repeat(want_zeros, group, 0)) * np.repeat(want_scales, group, 0)
  err, want_err = output_error(x, w, w_hat), output_error(x, w, jnp.asarray(want_hat))
  assert abs(err - want_err) <= 0.01 * want_err


def test_uncorrelated_inputs_reduce_it_to_round_to_nearest():
  """H = c·I: U is diagonal, no error moves to other rows, so GPTQ is RTN code for code."""
  _, w = _data()
  h = 3.0 * jnp.eye(w.shape[0])
  got = gptq(w, h, bits=4, group_size=64)
  want = rtn(w, bits=4, group_size=64)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_below_round_to_nearest_on_correlated_inputs(bits):
  x, w = _data(seed=bits)
  h = hessian(x)
  e_gptq = output_error(x, w, intq.dequantize(*gptq(w, h, bits=bits, group_size=64), 64))
  e_rtn = output_error(x, w, intq.dequantize(*rtn(w, bits=bits, group_size=64), 64))
  assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_dead_inputs_get_zero_rows():
  x, w = _data(k=128, n=16)
  x = x.at[:, 5].set(0.0)
  codes, scales, zeros = gptq(w, hessian(x), bits=4, group_size=32)
  w_hat = intq.dequantize(codes, scales, zeros, 32)
  assert np.all(np.abs(np.asarray(w_hat[5])) <= np.asarray(scales[0]) / 2 + 1e-7)
  assert np.all(np.isfinite(np.asarray(w_hat)))


def test_blocks_hold_whole_groups():
  assert block_rows(384, 128) == 128 and block_rows(192, 64) == 64
  assert block_rows(512, 256) == 256 and block_rows(64, 64) == 64 and block_rows(256, 32) == 128


def test_bad_inputs_fail_clearly():
  w = jnp.zeros((128, 8))
  with pytest.raises(ValueError, match="bits = 5 is not supported"):
    gptq(w, jnp.eye(128), bits=5, group_size=32)
  with pytest.raises(ValueError, match="not a whole number of groups of 48"):
    gptq(w, jnp.eye(128), bits=4, group_size=48)
  with pytest.raises(ValueError, match=r"H must be \[K, K\]"):
    gptq(w, jnp.eye(64), bits=4, group_size=32)
  with pytest.raises(ValueError, match="W must be a matrix"):
    rtn(jnp.zeros((4, 4, 4)), bits=4, group_size=4)
