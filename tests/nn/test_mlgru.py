"""MLGRU: the linear_scan form equals a step loop and the gate algebra of its docstring."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx.kernels import _testing
from memx.models.config import matmulfree_config
from memx.nn.mlgru import MLGRU, lower_bounds

CFG = matmulfree_config(vocab_size=32, d_model=16, n_layers=3, n_heads=2)


def _x(b=2, t=11, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, 16))


def test_scan_equals_step_loop_with_lower_bound():
  layer, x = MLGRU(CFG, 0, rngs=nnx.Rngs(0)), _x()
  lb = jnp.linspace(0.0, 0.9, 16)
  y, cache = layer(x, lower_bound=lb, return_state=True)
  c, ys = layer.init_cache(2), []
  for t in range(x.shape[1]):
    y_t, c = layer.step(x[:, t], c, lower_bound=lb)
    ys.append(y_t)
  _testing.assert_allclose(jnp.stack(ys, 1), y, dtype=jnp.float32, name="steps")
  _testing.assert_allclose(c["state"], cache["state"], dtype=jnp.float32, name="state")
  assert cache["state"].shape == (2, 16) and cache["state"].dtype == jnp.float32


def test_recurrence_matches_definition():
  layer, x = MLGRU(CFG, 0, rngs=nnx.Rngs(0)), _x(1, 4)
  # A learned (not all-ones) output-norm scale, so the definition's scale is exercised.
  layer.h_norm[...] = jax.random.uniform(jax.random.key(7), (16,), minval=0.5, maxval=1.5)
  lb = jnp.full((16,), 0.3)
  f = 0.3 + 0.7 * jax.nn.sigmoid(layer.w_f(x))
  c = jax.nn.silu(layer.w_c(x))
  h, hs = jnp.zeros((1, 16)), []
  for t in range(4):
    h = f[:, t] * h + (1 - f[:, t]) * c[:, t]
    hs.append(h)
  h = jnp.stack(hs, 1)
  g = jax.nn.sigmoid(layer.w_g(x))
  hn = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + CFG.norm_eps)
  hn = hn * layer.h_norm[...][None, None, :]
  want = layer.w_o(g * hn)
  _testing.assert_allclose(layer(x, lower_bound=lb), want, dtype=jnp.float32, name="mlgru")


def test_segment_ids_restart_state():
  layer, x = MLGRU(CFG, 0, rngs=nnx.Rngs(0)), _x(1, 8)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  y = layer(x, seg)
  _testing.assert_allclose(y[:, 3:], layer(x[:, 3:]), dtype=jnp.float32, name="segment")


def test_lower_bounds_start_at_zero_and_increase():
  lb = lower_bounds(jnp.zeros((4, 3)))
  np.testing.assert_allclose(lb[:, 0], [0.0, 0.25, 0.5, 0.75], atol=1e-6)
  lb = lower_bounds(jax.random.normal(jax.random.key(0), (5, 7)))
  assert bool(jnp.all(lb[0] == 0)) and bool(jnp.all(jnp.diff(lb, axis=0) >= 0))
  assert bool(jnp.all(lb < 1))
