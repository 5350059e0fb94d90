"""Recompute-in-backward ops: RMSNorm (memx.kernels.norms) and the fused BitLinear.

Oracle: the same expressions differentiated by plain autodiff (`*_reference`). Memory: the
bytes each form keeps for the backward pass, read exactly off the linearized program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.norms import rms_norm, rms_norm_reference
from memx.kernels.ternary.bitlinear import bitlinear, bitlinear_reference
from memx.train.memory import saved_activation_bytes

B, T, K, N = 2, 7, 48, 40


def _inputs(dtype=jnp.float32, seed=0):
  kx, kg, kw = jax.random.split(jax.random.key(seed), 3)
  x = (3.0 * jax.random.normal(kx, (B, T, K))).astype(dtype)
  g = (1.0 + 0.3 * jax.random.normal(kg, (K,))).astype(dtype)
  w = (0.5 * jax.random.normal(kw, (K, N))).astype(dtype)
  return x, g, w


def _cotangent(shape, seed=9):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_values_and_gradients(dtype):
  x, g, _ = _inputs(dtype)
  ct = _cotangent((B, T, K))
  np.testing.assert_array_equal(rms_norm(x, g, 1e-6), rms_norm_reference(x, g, 1e-6))

  def loss(fn):
    return lambda x, g: jnp.sum(fn(x, g, 1e-6).astype(jnp.float32) * ct)

  got = jax.grad(loss(rms_norm), argnums=(0, 1))(x, g)
  want = jax.grad(loss(rms_norm_reference), argnums=(0, 1))(x, g)
  for a, e in zip(got, want, strict=True):
    assert a.dtype == e.dtype
  _testing.assert_tree_allclose(got, want, dtype=dtype, grad=True, names=("dx", "dg"))


def test_rms_norm_keeps_only_its_input():
  x, g, _ = _inputs()

  def loss(fn):
    return lambda x, g: jnp.sum(jnp.sin(fn(x, g, 1e-6)))

  # sin keeps cos(y): one [B, T, K] float32 in both; the reference adds its normalised copies.
  one = B * T * K * 4
  assert saved_activation_bytes(loss(rms_norm), x, g) == one
  assert saved_activation_bytes(loss(rms_norm_reference), x, g) >= 2 * one


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bitlinear_xla_matches_reference(dtype, quantize):
  x, g, w = _inputs(dtype)
  ct = _cotangent((B, T, N))
  kw = {"eps": 1e-6, "quantize": quantize, "compute_dtype": dtype}
  y = bitlinear(x, g, w, implementation="xla", **kw)
  np.testing.assert_array_equal(y, bitlinear_reference(x, g, w, **kw))  # same forward ops
  assert y.dtype == dtype and y.shape == (B, T, N)

  def loss(impl):
    return lambda x, g, w: jnp.sum(
        bitlinear(x, g, w, implementation=impl, **kw).astype(jnp.float32) * ct)

  got = jax.grad(loss("xla"), argnums=(0, 1, 2))(x, g, w)
  want = jax.grad(loss("reference"), argnums=(0, 1, 2))(x, g, w)
  for a, e in zip(got, want, strict=True):
    assert a.dtype == e.dtype and a.shape == e.shape
  # dW sums over B·T tokens: widen by that reduction as well as by K.
  _testing.assert_tree_allclose(got, want, dtype=dtype, grad=True, names=("dx", "dg", "dW"))


def test_bitlinear_straight_through_gradient_is_the_definition():
  """dW = x̃ᵀ dy and d(xn) = dy W̃ᵀ, with x̃, W̃ the quantized operands (STE)."""
  x, g, w = _inputs()
  ct = _cotangent((B, T, N))
  dw = jax.grad(lambda w: jnp.sum(bitlinear(x, g, w) * ct))(w)
  xn = rms_norm_reference(x, g, 1e-6)
  codes = jnp.clip(jnp.round(xn * (127 / jnp.max(jnp.abs(xn), -1, keepdims=True))), -128, 127)
  xq = codes / (127 / jnp.max(jnp.abs(xn), -1, keepdims=True))
  _testing.assert_allclose(dw, jnp.einsum("btk,btn->kn", xq, ct), grad=True,
                           reduction_size=B * T, name="dW")


def test_bitlinear_xla_keeps_only_x():
  x, g, w = _inputs()

  def loss(impl):
    return lambda x, g, w: jnp.sum(jnp.sin(bitlinear(x, g, w, implementation=impl)))

  out = B * T * N * 4  # cos(y) for the sin
  assert saved_activation_bytes(loss("xla"), x, g, w) == out
  # autodiff keeps the quantized input and weight (at least [B, T, K] + [K, N] float32) too
  assert saved_activation_bytes(loss("reference"), x, g, w) >= out + 4 * (B * T * K + K * N)


def test_bitlinear_bad_input():
  x, g, w = _inputs()
  with pytest.raises(ValueError, match="K = 48"):
    bitlinear(x[..., :-1], g, w)
  with pytest.raises(ValueError, match="norm scale"):
    bitlinear(x, g[:-1], w)
  with pytest.raises(ValueError, match="weight must be"):
    bitlinear(x, g, w[None])
  with pytest.raises(ValueError, match="int32"):
    bitlinear(x.astype(jnp.int32), g, w)
  with pytest.raises(NotImplementedError, match="available"):
    bitlinear(x, g, w, implementation="pallas_gpu")


def test_backward_of_sequence_sharded_input_gathers_nothing():
  """Under sequence parallelism the recomputing backward must stay local to each shard: no
  all-gather of a [B, T, K] activation (a [tokens, K] reshape of a T-sharded array forces one)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("seq",))
  x, g, w = _inputs()
  x = jnp.concatenate([x] * 5, axis=1)[:, :32]  # T = 32: divisible by 8
  seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
  rep = NamedSharding(mesh, PartitionSpec())

  def grads(x, g, w):
    loss = lambda x, g, w: jnp.sum(jnp.sin(bitlinear(rms_norm(x, g, 1e-6), g, w)))  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(x, g, w)

  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
          for a, s in ((x, seq), (g, rep), (w, rep))]
  text = jax.jit(grads).lower(*args).compile(_testing.FAST_CPU_COMPILE).as_text()
  assert "all-gather" not in text
