"""FP8 AdamW moments (optim.moment_quant, COAT): the round trip's error bound with dynamic range
expansion, what plain group scaling loses, Adam's updates, training, and the state's bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)
from memx.errors import ConfigError
from memx.train import fp8_adam
from memx.train._testing import fixed_batch_losses, step_temp_bytes


def _wide(shape, sigma, seed=0):
  """Signed log-normal numbers: a moment's spread of magnitudes."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jnp.exp(sigma * jax.random.normal(k1, shape)) * jnp.sign(jax.random.normal(k2, shape))


@pytest.mark.parametrize("sigma", [0.5, 2.0, 4.0])
def test_round_trip_error_is_the_cast_error_over_k(sigma):
  """E4M3 rounds with relative error at most 2^-4 in its normal range; decoding takes the k-th
  root, so each number comes back within (1 + 2^-4)^(1/k) - 1 of itself (a float32 margin)."""
  x = _wide((8, 256), sigma)
  q = fp8_adam.quantize(x)
  assert q.codes.dtype == jnp.float8_e4m3fn and q.codes.shape == x.shape
  assert q.scale.shape == q.exponent.shape == (8, 2)
  back = np.asarray(fp8_adam.dequantize(q), np.float64)
  xs = np.asarray(x, np.float64)
  k = np.repeat(np.asarray(q.exponent, np.float64), 128, axis=-1)
  bound = (1 + 2.0 ** -4) ** (1 / k) - 1
  rel = np.abs(back - xs) / np.abs(xs)
  assert np.all(rel <= bound * 1.0001 + 1e-6), (rel / bound).max()
  assert np.all(np.sign(back) == np.sign(xs))
  # Each group's largest magnitude is exact: it is the scale.
  top = np.abs(xs).reshape(8, 2, 128).max(-1)
  np.testing.assert_allclose(np.asarray(q.scale), top, rtol=1e-6)


def test_expansion_keeps_what_plain_scaling_flushes():
  """A second moment (squared gradients) spans ~1e8 in a group: group-scaled FP8 without the
  expansion sends its small entries to zero (Adam would then divide by ~eps), the expansion
  keeps every entry within its bound."""
  v = jnp.square(_wide((4, 256), 2.0, seed=1))
  plain = np.asarray(fp8_adam.dequantize(fp8_adam.quantize(v, expand=False)))
  expanded = np.asarray(fp8_adam.dequantize(fp8_adam.quantize(v)))
  assert (plain == 0).mean() > 0.1
  assert (expanded == 0).sum() == 0
  rel = lambda a: np.abs(a - np.asarray(v)) / np.asarray(v)  # noqa: E731
  assert rel(expanded).mean() < 0.25 * rel(plain).mean()


def test_odd_shapes_zeros_and_scalars():
  x = jnp.zeros((3, 50)).at[1].set(_wide((50,), 1.0))   # 128 does not divide 50: one group/row
  q = fp8_adam.quantize(x)
  assert q.scale.shape == (3, 1)
  back = fp8_adam.dequantize(q)
  np.testing.assert_array_equal(back[0], 0.0)
  np.testing.assert_array_equal(back[2], 0.0)
  np.testing.assert_allclose(back[1], x[1], rtol=0.07)
  for y in (jnp.float32(-3.5), jnp.asarray([2.0, 0.0, -1.0])):
    np.testing.assert_allclose(fp8_adam.dequantize(fp8_adam.quantize(y)), y, rtol=0.07)
  assert fp8_adam.dequantize(fp8_adam.quantize(jnp.float32(-3.5))).shape == ()


def test_updates_follow_adam():
  """The first update is Adam's (computed from float32 moments before they are stored; equal
  up to the last bit of the bias correction's rounding); the next ones stay within the
  moments' quantization error of Adam's."""
  params = {"w": jnp.zeros((4, 256)), "b": jnp.zeros((7,))}
  fp8 = fp8_adam.scale_by_adam_fp8(0.9, 0.95, 1e-8)
  ref = optax.scale_by_adam(0.9, 0.95, 1e-8)
  s8, sr = fp8.init(params), ref.init(params)
  for step in range(5):
    grads = jax.tree.map(lambda p, s=step: _wide(p.shape, 1.0, seed=10 + s) * 1e-3, params)
    u8, s8 = fp8.update(grads, s8)
    ur, sr = ref.update(grads, sr)
    for k in params:
      if step == 0:
        np.testing.assert_allclose(u8[k], ur[k], rtol=1e-6)
      else:
        # Near-cancelling moments have large relative errors: compare on the updates' scale
        # (Adam's are about ±1).
        np.testing.assert_allclose(u8[k], ur[k], rtol=0.1, atol=0.05)


def test_fp8_moments_train_like_float32_ones():
  losses = {}
  for quant in (None, "fp8"):
    losses[quant] = fixed_batch_losses(Config(
        model=ModelConfig(vocab_size=264, d_model=128, n_layers=1, n_heads=2),
        data=DataConfig(source="corpus", seq_len=32),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, moment_quant=quant),
        train=TrainConfig(steps=12, batch_size=4)))
  assert losses["fp8"][-1] < 0.8 * losses["fp8"][0]
  assert abs(losses["fp8"][-1] - losses[None][-1]) < 0.05 * losses[None][-1], losses


def test_the_step_dequantizes_one_leaf_at_a_time():
  """Compiled temporaries where weights dominate (d 256, 16 tokens per device): less than one
  parameter-sized array over AdamW's float32 step (one device, measured 11.7 MiB against
  12.8; dequantizing every leaf's moments at once took 52.6, 6.2x the parameters more)."""
  temps = {}
  for quant in (None, "fp8"):
    cfg = Config(model=ModelConfig(vocab_size=264, d_model=256, n_layers=2, n_heads=4),
                 data=DataConfig(source="corpus", seq_len=16),
                 optim=OptimConfig(moment_quant=quant),
                 train=TrainConfig(steps=2, batch_size=jax.device_count()),
                 checkpoint=CheckpointConfig(enabled=False))
    temps[quant], params = step_temp_bytes(cfg)
  assert temps["fp8"] - temps[None] < 1.0 * params, (temps, params)


def test_state_bytes_and_settings():
  from memx.train.step import abstract_state

  def opt_bytes(**kw):
    cfg = Config(model=ModelConfig(vocab_size=256, d_model=128, n_layers=1, n_heads=2),
                 optim=OptimConfig(**kw))
    ts = abstract_state(cfg, jax.random.key(0))
    leaves = jax.tree.leaves(ts.state[0])
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ts.state[1])), leaves

  f32, leaves = opt_bytes()
  fp8, _ = opt_bytes(moment_quant="fp8")
  n = sum(x.size for x in leaves)
  assert 8 * n <= f32 < 8 * n + 64
  # Two 1-byte codes per parameter, and per group (128, or the last axis where 128 does not
  # divide it: the attention weights' head_dim 64) a float32 scale and exponent per moment.
  want = sum(2 * x.size + 16 * x.size // fp8_adam.group_size(x.shape) for x in leaves)
  assert want <= fp8 < want + 64 and fp8 < 0.3 * f32, (fp8, want)
  with pytest.raises(ConfigError, match="optim.moment_quant = 'fp4'"):
    OptimConfig(moment_quant="fp4")
  with pytest.raises(ConfigError, match="use optim.name adamw"):
    OptimConfig(name="lion", moment_quant="fp8")
  with pytest.raises(ConfigError, match="leave mu_dtype None"):
    OptimConfig(mu_dtype="bfloat16", moment_quant="fp8")
