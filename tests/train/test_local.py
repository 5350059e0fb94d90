"""Local learning (local.groups > 1, memx.train.local): the step's gradient is that of the sum of
the groups' losses with stop_gradient at every boundary, the last group's parameters get the
model's own gradient, the step's activations are one group's (the compiled step's exact
temporaries), MAN's auxiliary blocks follow their layers' moving average, and runs train,
checkpoint and resume exactly."""

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
  FinetuneConfig,
  LocalConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
  config_hash,
)
from memx.errors import ConfigError
from memx.parallel.sequence import batch_to_layout
from memx.train import local
from memx.train._testing import (
  fixed_batch,
  fixed_batch_losses,
  step_temp_bytes,
  straight_and_resumed,
)
from memx.train.finetune import param_count
from memx.train.loss import feature_losses, lm_token_losses, weight_total, weighted_mean
from memx.train.step import init_state, make_apply_step, make_grad_step

MODEL = ModelConfig(vocab_size=264, d_model=64, n_layers=4, n_heads=2)
CFG = Config(model=MODEL, data=DataConfig(source="corpus", seq_len=32),
             train=TrainConfig(steps=2, batch_size=4), local=LocalConfig(groups=2))


def _with(cfg=CFG, model=None, train=None, **local_fields):
  return dataclasses.replace(cfg, model=model or cfg.model, train=train or cfg.train,
                             local=dataclasses.replace(cfg.local, **local_fields))


def test_groups_and_auxiliary_layers():
  assert local.group_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
  assert local.group_layers(4, 4) == [range(i, i + 1) for i in range(4)]
  # AugLocal's pyramid: depth 4 falls linearly to ceil(4 / 3) = 2 for the last auxiliary
  # group, each spread evenly over the layers after the group.
  assert local.aux_layers(12, LocalConfig(groups=4, aux_depth=4)) == [
      (3, 5, 7, 9), (6, 8, 10), (9, 10)]
  assert local.aux_layers(12, LocalConfig(groups=4, aux_depth=4, aux_decay=False))[2] == (
      9, 9, 10, 11)
  assert local.aux_layers(8, LocalConfig(groups=2, aux_depth=0)) == [()]


def _oracle_grads(cfg, state, graphdef, batch):
  """The gradient of Σ_g L_g with stop_gradient between groups, by one plain nnx.grad."""
  model, _ = nnx.merge(graphdef, state)
  b, positions = batch_to_layout(batch)
  total = weight_total(b["weights"])
  groups = local.group_layers(cfg.model.n_layers, cfg.local.groups)

  def loss(model):
    x, out = model.embed_tokens(b["inputs"]), 0.0
    for g, layers in enumerate(groups):
      x = model.run_layers(x, layers, positions)
      last = g == len(groups) - 1
      features = model.final_norm(x) if last else model.local_aux[g](model, x, positions, None)
      out = out + weighted_mean(feature_losses(model, features, b["targets"],
                                               cfg.train.loss_vocab_block), b["weights"], total)
      x = jax.lax.stop_gradient(x)
    return out
  return nnx.grad(loss)(model)


@pytest.mark.parametrize("case", [
    dict(groups=3, aux_depth=2),
    dict(groups=4, aux_depth=0),
    dict(groups=2, aux_weights="ema"),
    dict(groups=2, untied=True, vocab_block=128),
    dict(groups=3, hybrid=True),
], ids=["auglocal", "linear-probe", "man", "untied-blocked-loss", "hybrid-mlgru"])
def test_gradient_is_the_stop_gradient_sum_of_group_losses(case):
  case = dict(case)
  model = MODEL
  if case.pop("untied", False):
    model = dataclasses.replace(model, tie_embeddings=False)
  if case.pop("hybrid", False):  # MLGRU's lower bounds: one parameter every group's loss uses
    model = dataclasses.replace(model, mixers=("attention", "mlgru", "mamba2", "mlgru"))
  train = dataclasses.replace(CFG.train, loss_vocab_block=case.pop("vocab_block", 0))
  cfg = _with(model=model, train=train, **case)
  ts = init_state(cfg, jax.random.key(0))
  batch = fixed_batch(cfg)
  grads, metrics = jax.jit(make_grad_step(cfg, ts.graphdef))(ts.state, batch)
  want = _oracle_grads(cfg, ts.state, ts.graphdef, batch)
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
  # The logged loss is the model's own; one auxiliary loss per group but the last.
  model_, _ = nnx.merge(ts.graphdef, ts.state)
  own = weighted_mean(lm_token_losses(model_, batch["inputs"], batch["targets"]),
                      batch["weights"])
  np.testing.assert_allclose(metrics["loss"], own, rtol=1e-6)
  assert metrics["local_loss"].shape == (cfg.local.groups - 1,)


def test_last_group_gets_backprops_gradient_and_the_first_does_not():
  cfg = _with(groups=2, aux_depth=1)
  ts = init_state(cfg, jax.random.key(0))
  batch = fixed_batch(cfg)
  grads = jax.jit(make_grad_step(cfg, ts.graphdef))(ts.state, batch)[0]
  e2e = jax.jit(make_grad_step(_with(groups=1), ts.graphdef))(ts.state, batch)[0]
  for name in ("attn", "mlp"):  # layer 3 is in the last group, layer 0 in the first
    for a, b in zip(jax.tree.leaves(grads["blocks"][3][name]),
                    jax.tree.leaves(e2e["blocks"][3][name]), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  first = jax.tree.leaves(grads["blocks"][0]["attn"])[0]
  assert not np.allclose(first, jax.tree.leaves(e2e["blocks"][0]["attn"])[0], rtol=0.05)


def test_microbatches_accumulate_the_same_gradient():
  cfg = _with(groups=2, train=dataclasses.replace(CFG.train, batch_size=4))
  ts = init_state(cfg, jax.random.key(0))
  batch = fixed_batch(cfg)
  whole, m1 = jax.jit(make_grad_step(cfg, ts.graphdef))(ts.state, batch)
  two = _with(cfg, train=dataclasses.replace(cfg.train, microbatches=2))
  split, m2 = jax.jit(make_grad_step(two, ts.graphdef))(ts.state, batch)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(m1["local_loss"], m2["local_loss"], rtol=1e-5)


def test_step_keeps_one_groups_activations():
  """XLA's exact temporaries of the compiled step: 8 layers in 4 groups with 1-block
  auxiliary networks keep about two layers' activations (plus a loss's) instead of eight."""
  model = dataclasses.replace(MODEL, n_layers=8, d_model=128, n_heads=4)
  base = Config(model=model, data=DataConfig(source="corpus", seq_len=256),
                train=TrainConfig(steps=1, batch_size=8 * jax.device_count()))
  e2e, _ = step_temp_bytes(base)
  four, _ = step_temp_bytes(_with(base, groups=4, aux_depth=1))
  probes, _ = step_temp_bytes(_with(base, groups=8, aux_depth=0))
  assert four < 0.6 * e2e, (four, e2e)
  assert probes < 0.35 * e2e, (probes, e2e)


def test_man_blocks_start_as_their_layers_and_follow_their_moving_average():
  cfg = dataclasses.replace(_with(groups=2, aux_depth=1, aux_weights="ema", ema_decay=0.9),
                            optim=OptimConfig(warmup_steps=0))
  ts = init_state(cfg, jax.random.key(0))
  model, _ = nnx.merge(ts.graphdef, ts.state)
  aux = model.local_aux[0]
  assert aux.layers == (2,)
  source = nnx.state(model.blocks[2], nnx.Param)
  copy = nnx.state(aux.blocks[0], local.EMAWeight)
  assert not jax.tree.leaves(nnx.state(aux.blocks[0], nnx.Param))  # nothing of it trains
  for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(copy), strict=True):
    np.testing.assert_array_equal(a, b)

  batch = fixed_batch(cfg)
  grads = jax.jit(make_grad_step(cfg, ts.graphdef))(ts.state, batch)[0]
  assert "blocks" not in grads[local.AUX][0]  # the biases and the norm train, the copies do not
  state = jax.jit(make_apply_step(cfg, ts.graphdef))(ts.state, grads)
  after, _ = nnx.merge(ts.graphdef, state)
  new_source = nnx.state(after.blocks[2], nnx.Param)
  new_copy = nnx.state(after.local_aux[0].blocks[0], local.EMAWeight)
  for old, src, got in zip(jax.tree.leaves(copy), jax.tree.leaves(new_source),
                           jax.tree.leaves(new_copy), strict=True):
    np.testing.assert_allclose(got, 0.9 * old + 0.1 * src, rtol=1e-6, atol=1e-8)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(source), jax.tree.leaves(new_source), strict=True))


def test_local_learning_trains():
  cfg = dataclasses.replace(_with(groups=2, aux_depth=1, train=TrainConfig(steps=30, batch_size=4)),
                            optim=OptimConfig(lr=3e-3, warmup_steps=0))
  losses = fixed_batch_losses(cfg)
  assert losses[-1] < 0.7 * losses[0], losses


def test_a_man_run_logs_local_losses_and_resumes_exactly(tmp_path):
  """The moving averages are model state: checkpointed, restored, and advanced by the split
  grad/apply steps a lazy checkpoint uses as by the fused step."""
  cfg = dataclasses.replace(
      _with(groups=2, aux_weights="ema"),
      train=TrainConfig(steps=6, batch_size=8, log_every=1, eval_batches=1),
      checkpoint=CheckpointConfig(every=3, keep=3))
  full, (straight, resumed), states = straight_and_resumed(cfg, tmp_path, stop_at=3)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
  assert all(np.isfinite(r["local_loss_0"]) for r in straight)
  for x, y in zip(*(jax.tree.leaves(s) for s in states), strict=True):
    np.testing.assert_array_equal(x, y)
  # The summary counts the model's parameters, not the training-only auxiliary networks.
  plain = init_state(_with(groups=1), jax.random.key(0))
  assert full["params"] == param_count(nnx.merge(plain.graphdef, plain.state)[0])


def test_defaults_leave_the_config_hash_and_model_unchanged():
  no_local = Config(model=MODEL)
  assert config_hash(no_local) == config_hash(dataclasses.replace(no_local,
                                                                  local=LocalConfig()))
  assert config_hash(_with(groups=2)) != config_hash(_with(groups=1))
  # The model's own initialization is a backprop run's: the auxiliary networks draw apart.
  a = init_state(_with(groups=2), jax.random.key(0)).state[0]
  b = init_state(_with(groups=1), jax.random.key(0)).state[0]
  for x, y in zip(jax.tree.leaves(a["blocks"]), jax.tree.leaves(b["blocks"]), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fields,match", [
    (dict(groups=0), "local.groups"),
    (dict(aux_depth=-1), "local.aux_depth"),
    (dict(aux_weights="mean"), "local.aux_weights"),
    (dict(ema_decay=1.0), "local.ema_decay"),
    (dict(aux_weights="ema", aux_depth=0), "aux_depth >= 1"),
])
def test_bad_settings_are_refused(fields, match):
  with pytest.raises(ConfigError, match=match):
    LocalConfig(**fields)


@pytest.mark.parametrize("change,match", [
    (dict(local=LocalConfig(groups=5)), "at most 4 groups"),
    (dict(local=LocalConfig(groups=2),
          optim=OptimConfig(name="sgd", estimator="mezo", clip_norm=None)), "estimator"),
    (dict(local=LocalConfig(groups=2), finetune=FinetuneConfig(lora_rank=4)), "lora_rank"),
])
def test_incompatible_runs_are_refused_before_compute(change, match):
  from memx.train.loop import prepare
  with pytest.raises(ConfigError, match=match):
    prepare(dataclasses.replace(CFG, **change))


@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["fsdp", "sp"])
def test_one_sharded_local_step_matches_one_device(strategy):
  """Local learning under FSDP and ring sequence parallelism (8 devices): the updated state is
  the one-device step's."""
  from memx.config import ParallelConfig
  from memx.parallel.constrain import sharding_context
  from memx.parallel.mesh import batch_sharding, make_mesh
  from memx.train.step import make_train_step, state_shardings

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  axes = ("data", "fsdp") if strategy == "fsdp" else ("data", "seq")
  cfg = dataclasses.replace(_with(groups=2, aux_depth=1),
                            train=dataclasses.replace(CFG.train, batch_size=8))
  batch = fixed_batch(cfg)

  def step(cfg, devices):
    mesh = make_mesh(cfg.parallel, devices)
    ts = init_state(cfg, jax.random.key(0))
    shardings = state_shardings(ts.state, mesh, cfg.parallel.strategy)
    state = jax.device_put(ts.state, shardings)
    b = jax.device_put(batch, batch_sharding(mesh, cfg.parallel.strategy))
    with sharding_context(mesh, cfg.parallel.strategy):
      new, metrics = jax.jit(make_train_step(cfg, ts.graphdef),
                             out_shardings=(shardings, None))(state, b)
    return jax.device_get(new), jax.device_get(metrics)

  one, m1 = step(cfg, jax.devices()[:1])
  sharded = dataclasses.replace(cfg, parallel=ParallelConfig(strategy=strategy,
                                                             mesh_shape=(1, 8), mesh_axes=axes))
  many, m8 = step(sharded, jax.devices()[:8])
  np.testing.assert_allclose(m8["local_loss"], m1["local_loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_local_learning_and_finetune_bases_combine(tmp_path):
  """A run trained with local learning serves as a base (its auxiliary networks stay behind),
  and a run with local learning starts from a plain base, MAN's averages from its weights."""
  from memx.experiment.rundir import write_config
  from memx.train.loop import train

  base_cfg = dataclasses.replace(_with(groups=2, aux_weights="ema"),
                                 train=TrainConfig(steps=2, batch_size=8, eval_batches=1),
                                 checkpoint=CheckpointConfig(every=2, keep=1))
  train(base_cfg, tmp_path / "local_base", progress=False)
  write_config(tmp_path / "local_base", base_cfg)
  plain = dataclasses.replace(base_cfg, local=LocalConfig(),
                              finetune=FinetuneConfig(base=str(tmp_path / "local_base")))
  ts = init_state(plain, jax.random.key(1))
  model, _ = nnx.merge(ts.graphdef, ts.state)
  assert not hasattr(model, local.AUX)

  tuned = dataclasses.replace(base_cfg, local=LocalConfig(groups=2, aux_weights="ema"),
                              finetune=FinetuneConfig(base=str(tmp_path / "local_base")))
  ts = init_state(tuned, jax.random.key(1))
  model, _ = nnx.merge(ts.graphdef, ts.state)
  for a, b in zip(jax.tree.leaves(nnx.state(model.blocks[2], nnx.Param)),
                  jax.tree.leaves(nnx.state(model.local_aux[0].blocks[0], local.EMAWeight)),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_man_averages_do_not_stall_in_bfloat16():
  model = dataclasses.replace(MODEL, param_dtype="bfloat16")
  cfg = dataclasses.replace(_with(model=model, groups=2, aux_weights="ema", ema_decay=0.99),
                            optim=OptimConfig(warmup_steps=0, lr=1e-2))
  ts = init_state(cfg, jax.random.key(0))
  before = nnx.state(nnx.merge(ts.graphdef, ts.state)[0].local_aux[0].blocks[0],
                     local.EMAWeight)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(before))
  grads = jax.jit(make_grad_step(cfg, ts.graphdef))(ts.state, fixed_batch(cfg))[0]
  state = jax.jit(make_apply_step(cfg, ts.graphdef))(ts.state, grads)
  after = nnx.state(nnx.merge(ts.graphdef, state)[0].local_aux[0].blocks[0], local.EMAWeight)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(before),
                                                          jax.tree.leaves(after), strict=True)]
  assert max(moved) > 0
