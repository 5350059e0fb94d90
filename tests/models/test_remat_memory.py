"""What the backward pass keeps: the Mamba-2 layer's own recompute, and remat="dots" keeping
the attention and SSD kernels' results instead of rerunning their forward passes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.models.config import ModelConfig, SSMConfig
from memx.models.transformer import TransformerLM
from memx.nn.linear_attention import LinearAttention
from memx.nn.mamba2 import Mamba2
from memx.train.loss import lm_token_losses
from memx.train.memory import saved_activation_bytes

SSM = SSMConfig(d_state=16, head_dim=16, n_groups=1, chunk_size=32)
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ssm=SSM,
                  mixers=("mamba2",) * 2)
B, T = 2, 128


def _kept_bytes(layer, monkeypatch):
  """(bytes the layer keeps for its backward pass, the same without any jax.checkpoint), after
  checking that both give the same gradients."""
  x = jax.random.normal(jax.random.key(1), (B, T, layer.cfg.d_model))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

  def measure():
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    return saved_activation_bytes(loss, params, x), jax.tree.leaves(grads)

  kept, grads = measure()
  monkeypatch.setattr(jax, "checkpoint", lambda f, policy=None: f)  # autodiff keeps everything
  plain, plain_grads = measure()
  _testing.assert_tree_allclose(grads, plain_grads, dtype=jnp.float32, grad=True)
  return kept, plain


def test_mamba2_layer_keeps_projections_and_ssd_results_only(monkeypatch):
  kept, plain = _kept_bytes(Mamba2(CFG, 0, rngs=nnx.Rngs(0)), monkeypatch)
  # Exactly what the layer keeps (float32): the five in-projections' outputs z, x, B, C, Δ;
  # the SSD's output y and its chunk-entry states; the layer output (for the loss's sin).
  h, p, n = CFG.ssm_heads, SSM.head_dim, SSM.d_state
  per_token = 2 * h * p + 2 * n + h + h * p + CFG.d_model          # z, x; B, C; Δ; y; out
  states = (T // SSM.chunk_size) * h * p * n
  assert kept == 4 * B * (T * per_token + states), kept
  assert plain > 3 * kept, (plain, kept)


@pytest.mark.parametrize("gated", [False, True])
def test_linear_attention_layer_keeps_projections_and_kernel_results_only(gated, monkeypatch):
  cfg = dataclasses.replace(CFG, n_kv_heads=1, mixers=("linear_attention",) * 2,
                            ssm=dataclasses.replace(SSM, gated=gated, feature_map="elu1"))
  kept, plain = _kept_bytes(LinearAttention(cfg, 0, rngs=nnx.Rngs(0)), monkeypatch)
  # float32: q, k, v (and the gate logits); the kernel's output and chunk-entry states
  # [T/chunk, H, K, K]; the layer output.
  h, g, k = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  per_token = h * k + 2 * g * k + (h if gated else 0) + h * k + cfg.d_model
  states = (T // SSM.chunk_size) * h * k * k
  assert kept == 4 * B * (T * per_token + states), kept
  assert plain > 1.4 * kept, (plain, kept)


def _flops(cfg, batch=2, seq=1024):
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)))

  def loss(params):
    model = nnx.merge(graphdef, params, rest)
    return lm_token_losses(model, tokens[:, :-1], tokens[:, 1:]).mean()
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  return (cost if isinstance(cost, dict) else cost[0])["flops"]


@pytest.mark.parametrize("mixer", ["attention", "mamba2"])
def test_remat_dots_does_not_rerun_attention_or_ssd(mixer):
  """remat="dots" recomputes element-wise work only: its backward costs what remat="none"
  costs (measured +0.1% / +0.02%). Saving matmul outputs alone (the policy before kernel
  results were named) reran every attention and SSD forward pass: +11% / +5% here.

  Long enough sequences (8 attention blocks) that XLA cannot merge the blocks and then share
  the forward's scores with the backward pass (at T <= 512 it does so without remat, which
  makes remat="none" look cheaper than the blockwise algorithm is)."""
  cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2,
                    mixers=(mixer,) * 2)
  none = _flops(dataclasses.replace(cfg, remat="none"))
  dots = _flops(dataclasses.replace(cfg, remat="dots"))
  assert dots <= 1.01 * none, (dots, none)
