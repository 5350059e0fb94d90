"""MeZO (optim.estimator = "mezo"): the SPSA estimate is the directional derivative along z
(exact for a quadratic, within finite-difference error of backprop's for a model), z is drawn
again from its key, Sparse MeZO perturbs the small-magnitude entries only, and training with it
lowers the loss without any optimizer state for SGD."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)
from memx.errors import ConfigError
from memx.train import mezo
from memx.train._testing import (
  fixed_batch,
  fixed_batch_losses,
  step_temp_bytes,
  straight_and_resumed,
)
from memx.train.step import MEZO_STREAM, init_state, make_grad_step


def _quadratic(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"w": jax.random.normal(k[0], (6, 5)), "b": jax.random.normal(k[1], (5,))}
  a = jax.random.normal(k[2], (30, 30))
  a = a @ a.T / 30
  c = jax.random.normal(k[3], (35,))

  def loss(p):
    x = jnp.concatenate([p["w"].reshape(-1), p["b"]])
    return 0.5 * x[:30] @ a @ x[:30] + c @ x + jnp.sum(x[30:] ** 2)
  return params, loss


def test_spsa_is_the_exact_directional_derivative_of_a_quadratic():
  params, loss = _quadratic()
  key = jax.random.key(3)
  g, mean_loss, grads = mezo.spsa(loss, params, key, eps=0.5)
  z = mezo.direction(params, key)
  true = jax.grad(loss)(params)
  want = sum(jnp.vdot(z[k], true[k]) for k in params)
  np.testing.assert_allclose(g, want, rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(grads[k], g * z[k], rtol=1e-6)
  # The mean of L(θ ± εz) is L(θ) plus the curvature term ε²/2·zᵀAz.
  assert abs(float(mean_loss) - float(loss(params))) > 0


def test_direction_is_drawn_again_from_its_key():
  params, _ = _quadratic()
  one = mezo.direction(params, jax.random.key(1))
  again = mezo.direction(params, jax.random.key(1))
  other = mezo.direction(params, jax.random.key(2))
  for k in params:
    np.testing.assert_array_equal(one[k], again[k])
    assert not np.allclose(one[k], other[k])
  # Leaves get independent draws: equal shapes do not repeat one another.
  twins = mezo.direction({"a": jnp.zeros(64), "b": jnp.zeros(64)}, jax.random.key(1))
  assert not np.allclose(twins["a"], twins["b"])


def test_sparse_mezo_perturbs_the_smallest_entries_only():
  params, loss = _quadratic()
  params = {"w": params["w"], "b": params["b"], "big": jnp.arange(1.0, 101.0)}
  mask = mezo.masks(params, 0.75)
  assert int(mask["big"].sum()) == 25 and bool(mask["big"][:25].all())
  w_kept = np.abs(np.asarray(params["w"]))[np.asarray(mask["w"])]
  w_left = np.abs(np.asarray(params["w"]))[~np.asarray(mask["w"])]
  assert w_kept.max() <= w_left.min()
  z = mezo.direction(params, jax.random.key(0), mask)
  assert np.all(np.asarray(z["big"][25:]) == 0) and np.all(np.asarray(z["big"][:25]) != 0)
  _, _, grads = mezo.spsa(lambda p: loss({"w": p["w"], "b": p["b"]}) + p["big"].sum(),
                          params, jax.random.key(0), 1e-2, sparsity=0.75)
  assert np.all(np.asarray(grads["big"][25:]) == 0)


CFG = Config(model=ModelConfig(vocab_size=264, d_model=64, n_layers=1, n_heads=2),
             data=DataConfig(source="corpus", seq_len=32),
             optim=OptimConfig(name="sgd", lr=2e-3, warmup_steps=0, weight_decay=0.0,
                               clip_norm=None, estimator="mezo"),
             train=TrainConfig(steps=60, batch_size=4))


def test_the_step_estimate_matches_backprop_along_z():
  """The train step's estimate is g·z with g = zᵀ∇L up to finite-difference error (ε = 1e-3
  in float32), z from (train.seed, step); microbatches give the same estimate."""
  batch = fixed_batch(CFG)
  ts = init_state(CFG, jax.random.key(0))
  est, m = jax.jit(make_grad_step(CFG, ts.graphdef))(ts.state, batch)
  backprop_cfg = dataclasses.replace(CFG, optim=dataclasses.replace(CFG.optim,
                                                                    estimator="backprop"))
  true, m_true = jax.jit(make_grad_step(backprop_cfg, ts.graphdef))(ts.state, batch)
  _, params = nnx.split(nnx.merge(ts.graphdef, ts.state)[0], nnx.Param)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(CFG.train.seed), MEZO_STREAM), 0)
  z = mezo.direction(params, key)
  g_true = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(true),
                                               strict=True))
  first = jax.tree.leaves(est)[0].reshape(-1)
  g_est = first[0] / jax.tree.leaves(z)[0].reshape(-1)[0]
  np.testing.assert_allclose(g_est, g_true, rtol=2e-2, atol=1e-3)
  for e, d in zip(jax.tree.leaves(est), jax.tree.leaves(z), strict=True):
    np.testing.assert_allclose(e, g_est * d, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["loss"], m_true["loss"], rtol=1e-4)
  mb = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, microbatches=2))
  est2, _ = jax.jit(make_grad_step(mb, ts.graphdef))(ts.state, batch)
  for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(est2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_mezo_sgd_trains_without_optimizer_state():
  ts = init_state(CFG, jax.random.key(0))
  _, opt = nnx.merge(ts.graphdef, ts.state)
  opt_arrays = jax.tree.leaves(nnx.state(opt, nnx.OptState))
  assert all(x.size == 1 for x in opt_arrays)  # SGD: nothing but step counters
  losses = fixed_batch_losses(CFG)
  assert losses[-1] < losses[0] - 0.15, losses[::10]


def test_a_mezo_step_keeps_no_activations_for_a_backward_pass():
  """Compiled temporaries (exact on CPU) where activations dominate (256 tokens × 8 rows per
  device, d 64):
  MeZO's two forward passes need under 0.4× of backprop's forward + backward with the same
  stateless SGD (measured 9.5 MiB against 33.4)."""
  temps = {}
  for estimator, clip in (("backprop", 1.0), ("mezo", None)):
    cfg = Config(model=ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2),
                 data=DataConfig(source="corpus", seq_len=256),
                 optim=OptimConfig(name="sgd", lr=1e-3, estimator=estimator, clip_norm=clip),
                 train=TrainConfig(steps=2, batch_size=8 * jax.device_count()),
                 checkpoint=CheckpointConfig(enabled=False))
    temps[estimator], _ = step_temp_bytes(cfg)  # data parallel: 8 rows per device
  assert temps["mezo"] < 0.4 * temps["backprop"], temps


def test_a_mezo_step_holds_one_perturbed_copy_of_the_weights():
  """Where the weights dominate (d 256, 16 tokens per device), a MeZO step's temporaries stay
  near one copy of the parameters (the perturbed weights; measured 1.16x at d 512): each
  leaf's z is drawn, used and dropped in turn (before the leaf-by-leaf barriers: 4x)."""
  cfg = Config(model=ModelConfig(vocab_size=264, d_model=256, n_layers=2, n_heads=4),
               data=DataConfig(source="corpus", seq_len=16),
               optim=OptimConfig(name="sgd", lr=1e-3, estimator="mezo", clip_norm=None),
               train=TrainConfig(steps=2, batch_size=jax.device_count()),
               checkpoint=CheckpointConfig(enabled=False))
  temps, params = step_temp_bytes(cfg)
  assert temps < 1.5 * params, (temps, params)


def test_bad_mezo_settings():
  with pytest.raises(ConfigError, match="clip_norm"):
    OptimConfig(name="sgd", estimator="mezo")
  with pytest.raises(ConfigError, match="pairs with optim.name sgd"):
    OptimConfig(name="lion", estimator="mezo", clip_norm=None)
  with pytest.raises(ConfigError, match="optim.estimator = 'spsa'"):
    OptimConfig(estimator="spsa")
  with pytest.raises(ConfigError, match="only applies with optim.estimator = mezo"):
    OptimConfig(mezo_sparsity=0.5)
  with pytest.raises(ConfigError, match="mezo_sparsity"):
    OptimConfig(name="sgd", estimator="mezo", clip_norm=None, mezo_sparsity=1.0)
  with pytest.raises(ConfigError, match="mezo_eps"):
    OptimConfig(name="sgd", estimator="mezo", clip_norm=None, mezo_eps=0.0)
  from memx.train.loop import prepare
  bf16 = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, param_dtype="bfloat16"))
  with pytest.raises(ConfigError, match="keep float32 parameters"):
    prepare(bf16)


def test_a_mezo_run_resumes_exactly(tmp_path):
  """z comes from (seed, step): a run stopped at step 3 and resumed logs the same losses and
  ends with the same parameters as one run straight through."""
  cfg = dataclasses.replace(CFG, train=TrainConfig(steps=6, batch_size=8, log_every=1,
                                                   eval_batches=1),
                            checkpoint=CheckpointConfig(every=3, keep=3))
  _, (straight, resumed), states = straight_and_resumed(cfg, tmp_path, stop_at=3)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight] and len(straight) == 6
  for x, y in zip(*(jax.tree.leaves(s) for s in states), strict=True):
    np.testing.assert_array_equal(x, y)
