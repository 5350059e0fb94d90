"""The blocked-vocabulary loss under the parallel strategies equals the full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from memx.kernels import _testing
from memx.kernels.cross_entropy import cross_entropy
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM
from memx.parallel.constrain import sharding_context
from memx.train.loss import token_losses


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy,shape,axes", [
    ("fsdp", (8,), ("fsdp",)),
    ("fsdp_tp", (4, 2), ("fsdp", "tensor")),
    ("sp", (2, 4), ("data", "seq")),
])
def test_blocked_loss_matches_full_logits_under_sharding(strategy, shape, axes):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  cfg = ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=4)  # 200: padded last block
  graphdef, params = nnx.split(TransformerLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.integers(0, 200, (4, 64)), jnp.int32) for _ in range(2))

  def blocked(p):
    m = nnx.merge(graphdef, p)
    w, layout = m.head_weight()
    return cross_entropy(m.features(x), w, y, vocab_block=64, w_layout=layout).mean()

  def full(p):
    return token_losses(nnx.merge(graphdef, p)(x), y).mean()

  want = jax.jit(jax.value_and_grad(full))(params)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(shape), axes)
  with sharding_context(mesh, strategy):
    got = jax.jit(jax.value_and_grad(blocked)).lower(params).compile(
        _testing.FAST_CPU_COMPILE)(params)
  _testing.assert_allclose(got[0], want[0], name="loss")
  for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1]),
                          strict=True):
    _testing.assert_allclose(a, w, grad=True, name=jax.tree_util.keystr(path))
