"""BitLinear: quantized forward, straight-through backward, packed inference form; BitGLU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.kernels.ternary import (
    absmean_quantize,
    from_words,
    int8_fake_quant,
    pack_ternary,
    ternary_fake_quant,
)
from memx.models.config import matmulfree_config
from memx.nn.bitlinear import BitLinear, PackedBitLinear, pack_bitlinears
from memx.nn.glu import BitGLU
from memx.parallel.axes import EMBED, MLP


def _layer(quantize=True, seed=0):
  return BitLinear(24, 40, axes=(EMBED, MLP), std=0.5, rngs=nnx.Rngs(seed), quantize=quantize)


def _x(shape=(2, 5, 24), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def test_forward_is_rmsnorm_then_fake_quantized_matmul():
  layer, x = _layer(), _x()
  xn = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  want = int8_fake_quant(xn) @ ternary_fake_quant(layer.weight[...])
  _testing.assert_allclose(layer(x), want, dtype=jnp.float32, name="bitlinear")
  full = _layer(quantize=False)
  _testing.assert_allclose(full(x), xn @ full.weight[...], dtype=jnp.float32, name="fp")


def test_weights_used_are_ternary_times_scale():
  layer = _layer()
  w = ternary_fake_quant(layer.weight[...])
  codes, scale = absmean_quantize(layer.weight[...])
  np.testing.assert_allclose(w, codes * scale, rtol=1e-6)


def test_straight_through_gradient_reaches_latent_weights():
  layer, x = _layer(), _x()
  g = jax.random.normal(jax.random.key(5), (2, 5, 40))

  def loss(model, x):
    return jnp.sum(model(x) * g)

  grads, gx = nnx.grad(loss, argnums=(0, 1))(layer, x)
  # STE: dL/dW = x̃ᵀ g with x̃ the quantized normalised input, as if W̃ were W.
  xn = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  want = jnp.einsum("btk,btn->kn", int8_fake_quant(xn), g)
  _testing.assert_allclose(grads.weight[...], want, dtype=jnp.float32, grad=True, name="dW")
  assert float(jnp.abs(grads.norm[...]).sum()) > 0 and float(jnp.abs(gx).sum()) > 0


def test_packed_form_matches_training_form():
  layer, x = _layer(), _x()
  packed = layer.pack()
  assert isinstance(packed, PackedBitLinear)
  # 40 outputs: served as int32 words [6, 10] holding exactly pack_ternary's bytes [6, 40].
  assert packed.packed.shape == (6, 10) and packed.packed.dtype == jnp.int32
  assert packed.out_dim == 40
  np.testing.assert_array_equal(from_words(packed.packed[...]),
                                pack_ternary(absmean_quantize(layer.weight[...])[0]))
  _testing.assert_allclose(packed(x), layer(x), dtype=jnp.float32, reduction_size=24,
                           name="packed vs train")
  ref = PackedBitLinear(packed.packed[...], packed.scale[...], packed.norm[...], in_dim=24,
                        implementation="reference")
  np.testing.assert_array_equal(packed(x), ref(x))
  # An output width that is not a multiple of 4 keeps the byte layout; results agree.
  odd = BitLinear(24, 10, axes=(EMBED, MLP), std=0.5, rngs=nnx.Rngs(0)).pack()
  assert odd.packed.shape == (6, 10) and odd.packed.dtype == jnp.uint8 and odd.out_dim == 10
  with pytest.raises(ValueError, match="not quantized"):
    _layer(quantize=False).pack()


def test_bitglu_and_pack_bitlinears():
  cfg = matmulfree_config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=24)
  mlp, x = BitGLU(cfg, rngs=nnx.Rngs(0)), _x((2, 3, 16))
  y = mlp(x)
  assert y.shape == x.shape
  assert pack_bitlinears(mlp) == 2
  _testing.assert_allclose(mlp(x), y, dtype=jnp.float32, reduction_size=24, name="bitglu")
  fp = BitGLU(dataclasses.replace(cfg, ternary=False), rngs=nnx.Rngs(0))
  assert not fp.w_down.quantize
