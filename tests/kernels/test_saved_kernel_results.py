"""Under jax.checkpoint, `save_kernel_results` keeps attention's and SSD's forward results, so
the backward pass never reruns their forward kernels (every implementation with a custom VJP:
xla and, in the Pallas interpreter, pallas_gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import partial_eval as pe

from memx.kernels import _testing, save_kernel_results
from memx.kernels._dispatch import gpu_backend
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
  # ... from the same program: the forward kernel runs once (the plain count), where saving
  # nothing makes the backward pass rerun it.
  def forward_runs(policy):
    if impl == "pallas_gpu":  # interpreted kernels compile to one while loop per grid
      compiled = jax.jit(grad(policy)).lower(*args).compile()
      return compiled.as_text().count(" while(")
    # xla: the jaxpr's matmuls (XLA would merge some of the plain program's). Dead code is
    # removed first: jax 0.11 leaves an unused copy of the forward in the jaxpr.
    closed = jax.make_jaxpr(grad(policy))(*args)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return str(jaxpr).count("dot_general")
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


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_backend(), reason="needs an NVIDIA GPU backend")
@pytest.mark.parametrize("impl", ["cudnn", "pallas_gpu"])
def test_gpu_checkpoint_keeps_attention_results(impl):
  """On a GPU: cuDNN's forward (matched by its primitive's name, its residuals are unnamed)
  and the compiled Pallas kernels run once under the policy, twice when nothing is saved."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 512, 4, 64)), jnp.bfloat16) for _ in range(3))

  def f(q, k, v):
    return attention(q, k, v, mask=Mask(causal=True), implementation=impl)

  def forward_calls(policy):
    hlo = jax.jit(jax.grad(_loss(f, policy), argnums=(0, 1, 2))).lower(q, k, v).compile()
    calls = [line for line in hlo.as_text().splitlines() if "custom-call(" in line]
    if impl == "cudnn":  # __cudnn$fmha...: the backward's targets end in "Backward"
      return sum("__cudnn$fmha" in line and "Backward" not in line for line in calls)
    return sum("memx_attention_fwd" in line for line in calls)
  plain, kept = forward_calls("plain"), forward_calls(save_kernel_results)
  rerun = forward_calls(jax.checkpoint_policies.nothing_saveable)
  assert plain >= 1 and kept == plain < rerun, (plain, kept, rerun)
  _testing.assert_tree_allclose(
      jax.jit(jax.grad(_loss(f, save_kernel_results), argnums=(0, 1, 2)))(q, k, v),
      jax.jit(jax.grad(_loss(f, "plain"), argnums=(0, 1, 2)))(q, k, v), dtype=jnp.bfloat16,
      grad=True)


def test_policy_recognises_cudnn_attention_forward():
  """cuDNN's forward primitive is matched by name: fail here, not silently on a GPU, if a jax
  release renames it."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

  assert save_kernel_results(cudnn_attention._dot_product_attention_fwd_p_wrapper)
  assert not save_kernel_results(cudnn_attention._dot_product_attention_bwd_p_wrapper)
  assert not save_kernel_results(jax.lax.dot_general_p)
