"""Mamba-2 layer: recurrent step ≡ parallel form, packing, causality, initialisation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.kernels.short_conv import causal_conv
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig
from memx.nn.mamba2 import Mamba2
from memx.nn.short_conv import conv_state, conv_step

SSM = SSMConfig(d_state=16, head_dim=16, n_groups=2, chunk_size=16)
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mixers=("mamba2",) * 2,
                  ssm=SSM)


def _x(b=2, t=21, seed=0, cfg=CFG):
  return jax.random.normal(jax.random.key(seed), (b, t, cfg.d_model))


@pytest.fixture(scope="module")
def layer():
  return Mamba2(CFG, 0, rngs=nnx.Rngs(0))


def _steps(layer, x, cache):
  ys = []
  step = jit_for_test(lambda m, x_t, c: m.step(x_t, c))
  for t in range(x.shape[1]):
    y, cache = step(layer, x[:, t], cache)
    ys.append(y)
  return jnp.stack(ys, 1), cache


def test_step_form_equals_parallel_form(layer):
  x = _x()
  full, state = jit_for_test(lambda m, x: m(x, return_state=True))(layer, x)
  stepped, cache = _steps(layer, x, layer.init_cache(2))
  _testing.assert_allclose(stepped, full, name="y")
  for key in cache:
    _testing.assert_allclose(cache[key], state[key], name=key)
  # Prefill then continue: the state returned by the parallel form carries on exactly.
  head, mid = jit_for_test(lambda m, x: m(x, return_state=True))(layer, x[:, :13])
  tail, _ = _steps(layer, x[:, 13:], mid)
  _testing.assert_allclose(jnp.concatenate([head, tail], 1), full, name="prefill + steps")


def test_packed_segments_equal_separate_runs(layer):
  x = _x(b=1, t=30, seed=1)
  seg = jnp.asarray([[0] * 11 + [1] * 19], jnp.int32)
  run = jit_for_test(lambda m, x, seg: m(x, seg))
  packed = run(layer, x, seg)
  _testing.assert_allclose(packed[:, :11], run(layer, x[:, :11], None), name="first")
  _testing.assert_allclose(packed[:, 11:], run(layer, x[:, 11:], None), name="second")


def test_causal_by_gradient(layer):
  x = _x(b=1, t=20)
  g = jit_for_test(lambda m, x: jax.grad(lambda x: m(x)[:, 9].sum())(x))(layer, x)
  per_pos = np.abs(np.asarray(g)).sum(axis=(0, 2))
  assert np.all(per_pos[10:] == 0.0) and per_pos[0] > 0 and per_pos[9] > 0, per_pos


def test_initialisation_follows_mamba2(layer):
  s = CFG.ssm
  dt = jax.nn.softplus(layer.dt_bias[...])
  assert float(dt.min()) >= s.dt_min * 0.999 and float(dt.max()) <= s.dt_max * 1.001
  a = -jnp.exp(layer.a_log[...])
  assert float(a.max()) <= -s.a_init_min + 1e-6 and float(a.min()) >= -s.a_init_max - 1e-4
  assert np.all(np.asarray(layer.d[...]) == 1.0)
  bound = s.conv_width ** -0.5
  assert float(jnp.abs(layer.conv_x[...]).max()) <= bound
  h = CFG.ssm_heads
  assert layer.w_x.shape == (32, h, 16) and layer.w_b.shape == (32, 2, 16)
  assert layer.w_x.get_metadata()["axes"] == ("embed", "heads", "head_dim")
  assert layer.w_b.get_metadata()["axes"] == ("embed", "kv_heads", "state")


def test_bf16_close_to_fp32_and_keeps_ssm_params_fp32():
  x = _x()
  f32 = Mamba2(CFG, 0, rngs=nnx.Rngs(2))
  cfg16 = dataclasses.replace(CFG, compute_dtype="bfloat16", param_dtype="bfloat16")
  b16 = Mamba2(cfg16, 0, rngs=nnx.Rngs(2))
  assert b16.w_x[...].dtype == jnp.bfloat16 and b16.a_log[...].dtype == jnp.float32
  run = jit_for_test(lambda m, x: m(x))
  y16 = run(b16, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  # bf16 weights and activations: ~2^-8 relative per op, a few ops deep.
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(run(f32, x)), atol=3e-2,
                             rtol=5e-2)


def test_short_conv_step_and_state():
  x = jax.random.normal(jax.random.key(3), (2, 7, 3, 4))
  w = jax.random.normal(jax.random.key(4), (4, 3, 4))
  bias = jax.random.normal(jax.random.key(5), (3, 4))
  full = causal_conv(x, w, bias)
  state, ys = jnp.zeros((2, 3, 3, 4)), []
  for t in range(7):
    y, state = conv_step(state, x[:, t], w, bias)
    ys.append(y)
  _testing.assert_allclose(jnp.stack(ys, 1), full)
  _testing.assert_allclose(state, conv_state(x, 4))
  _testing.assert_allclose(conv_state(x[:, :2], 4)[:, 1:], x[:, :2])
  assert float(jnp.abs(conv_state(x[:, :2], 4)[:, 0]).max()) == 0.0




def test_state_of_a_packed_row_holds_only_its_last_segment(layer):
  """A packed row's returned state continues its last segment alone: a last segment shorter
  than the conv window must not carry the earlier segment's inputs into the continuation."""
  x, cont = _x(1, 20, seed=3), _x(1, 3, seed=4)
  seg = jnp.asarray([[0] * 18 + [1] * 2], jnp.int32)   # the last segment: 2 < W - 1 tokens
  _, state = layer(x, seg, return_state=True)
  _, alone = layer(x[:, 18:], return_state=True)
  for k in ("conv_x", "conv_b", "conv_c"):
    np.testing.assert_array_equal(state[k], alone[k])
  want = layer(jnp.concatenate([x[:, 18:], cont], 1))[:, 2:]
  _testing.assert_allclose(layer(cont, state=state), want, name="parallel continuation")
  _testing.assert_allclose(_steps(layer, cont, state)[0], want, name="step continuation")


def test_gated_norm_is_mamba2s_norm_of_the_gated_output():
  # RMSNormGated(norm_before_gate=False) restated in float64: norm(y · silu(z)) per group of
  # heads, times the scale (the layer's other tests compare the layer with itself).
  from memx.nn.mamba2 import gated_rms_norm
  rng = np.random.default_rng(0)
  y, z = rng.standard_normal((2, 5, 4, 8)), rng.standard_normal((2, 5, 4, 8))
  scale = rng.uniform(0.5, 1.5, (4, 8))
  g = (y * z / (1 + np.exp(-z))).reshape(2, 5, 2, 16)  # 2 groups of 2 heads
  want = (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(y.shape) * scale
  got = gated_rms_norm(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32),
                       jnp.asarray(scale, jnp.float32), 2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
