"""Under jax.checkpoint, `save_kernel_results` keeps attention's and SSD's forward results, so
the backward pass never reruns their forward kernels (every implementation with a custom VJP:
xla and, in the Pallas interpreter, pallas_gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing, save_kernel_results
from memx.kernels.attention import Mask, attention
from memx.kernels.ssd import BlockSizes as SSDBlocks
from memx.kernels.ssd import ssd
from memx.train.memory import saved_activation_bytes

B, T, H, D = 1, 256, 2, 32  # several attention blocks and SSD chunks: no single-block shortcuts


def _attention(impl):
  def f(q, k, v):
    return attention(q, k, v, mask=Mask(causal=True), implementation=impl,
                     interpret=impl == "pallas_gpu")
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3)]
  return f, args


def _ssd(impl):
  def f(x, dt, b, c):
    y, _ = ssd(x, dt, -jnp.ones((H,)), b, c, implementation=impl,
               block_sizes=SSDBlocks(chunk=64), interpret=impl == "pallas_gpu")
    return y
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
  dt = jnp.asarray(rng.uniform(0.01, 0.1, (B, T, H)), jnp.float32)
  b, c = (jnp.asarray(rng.standard_normal((B, T, 1, 16)), jnp.float32) for _ in range(2))
  return f, [x, dt, b, c]


def _loss(f, policy):
  g = f if policy == "plain" else jax.checkpoint(f, policy=policy)
  return lambda *a: jnp.sum(jnp.sin(g(*a)))


CASES = {"attention xla": (_attention, "xla"), "ssd xla": (_ssd, "xla"),
         "attention pallas_gpu": (_attention, "pallas_gpu"), "ssd pallas_gpu": (_ssd, "pallas_gpu")}


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_keeps_kernel_results_instead_of_rerunning_the_forward(name):
  make, impl = CASES[name]
  f, args = make(impl)
  grad = lambda policy: jax.grad(_loss(f, policy), argnums=range(len(args)))  # noqa: E731

  # Same gradients as without a checkpoint ...
  _testing.assert_tree_allclose(_testing.jit_for_test(grad(save_kernel_results))(*args),
                               _testing.jit_for_test(grad("plain"))(*args), dtype=jnp.float32,
                               grad=True)
  # ... from the same program: the forward kernel appears once in the differentiated program
  # (the plain count), where saving nothing makes the backward pass rerun it.
  def forward_runs(policy):
    text = str(jax.make_jaxpr(grad(policy))(*args))
    if impl == "pallas_gpu":
      return text.count("pallas_call")
    return text.count("dot_general")
  plain, kept = forward_runs("plain"), forward_runs(save_kernel_results)
  rerun = forward_runs(jax.checkpoint_policies.nothing_saveable)
  assert kept == plain < rerun, (plain, kept, rerun)
  # What is kept: the named results the backward pass needs (attention: output and
  # log-sum-exp; SSD: the chunk-entry states), never more than autodiff keeps without a
  # checkpoint.
  kept_bytes = saved_activation_bytes(_loss(f, save_kernel_results), *args)
  plain_bytes = saved_activation_bytes(_loss(f, "plain"), *args)
  none_bytes = saved_activation_bytes(_loss(f, jax.checkpoint_policies.nothing_saveable), *args)
  assert none_bytes < kept_bytes <= plain_bytes, (none_bytes, kept_bytes, plain_bytes)
