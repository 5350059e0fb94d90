"""Linear-attention layer: recurrent step ≡ parallel form for every feature map and the gate."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig
from memx.nn.linear_attention import LinearAttention

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  mixers=("linear_attention",) * 2, ssm=SSMConfig(chunk_size=16))


@pytest.mark.parametrize("feature_map, gated", [("identity", False), ("elu1", False),
                                                ("elu1", True)])
def test_step_form_equals_parallel_form(feature_map, gated):
  cfg = dataclasses.replace(CFG, ssm=dataclasses.replace(CFG.ssm, feature_map=feature_map,
                                                         gated=gated))
  layer = LinearAttention(cfg, 0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 19, 32))
  full, state = jit_for_test(lambda m, x: m(x, return_state=True))(layer, x)
  step = jit_for_test(lambda m, x_t, c: m.step(x_t, c))
  cache, ys = layer.init_cache(2), []
  for t in range(x.shape[1]):
    y, cache = step(layer, x[:, t], cache)
    ys.append(y)
  _testing.assert_allclose(jnp.stack(ys, 1), full, name="y")
  _testing.assert_allclose(cache["state"], state["state"], name="state")
  assert cache["state"].shape == (2, 4, 8, 8)


def test_packed_segments_equal_separate_runs_and_gate_is_in_unit_interval():
  cfg = dataclasses.replace(CFG, ssm=dataclasses.replace(CFG.ssm, gated=True))
  layer = LinearAttention(cfg, 0, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (1, 25, 32))
  seg = jnp.asarray([[0] * 9 + [1] * 16], jnp.int32)
  run = jit_for_test(lambda m, x, seg: m(x, seg))
  packed = run(layer, x, seg)
  _testing.assert_allclose(packed[:, :9], run(layer, x[:, :9], None), name="first")
  _testing.assert_allclose(packed[:, 9:], run(layer, x[:, 9:], None), name="second")
  *_, log_gate = jit_for_test(lambda m, x: m._qkv(x))(layer, x)
  assert float(log_gate.max()) < 0.0 and float(log_gate.min()) > -1.0
