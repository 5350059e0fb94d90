"""train.microbatches: gradient accumulation gives the full batch's loss, gradients and update
with the activations of one microbatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  ParallelConfig,
  TrainConfig,
)
from memx.data import make_loader
from memx.errors import ConfigError
from memx.models.config import SSMConfig
from memx.parallel.constrain import sharding_context
from memx.parallel.mesh import batch_sharding, make_mesh
from memx.train import microbatch
from memx.train.loop import prepare, train
from memx.train.memory import compiled_memory
from memx.train.metrics import read_metrics
from memx.train.step import init_state, make_eval_step, make_grad_step, make_train_step

# Task rows (the last 3 of every 8) weigh only their answer tokens: microbatches
# get unequal weights, so only the whole batch's denominator gives the full batch's loss.
TINY = Config(
    model=ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=16, task="mqar", task_fraction=0.375, mqar_pairs=2),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=4, batch_size=8, log_every=1, eval_batches=1),
    checkpoint=CheckpointConfig(enabled=False),
)
HYBRID = dataclasses.replace(TINY.model, n_layers=3, mixers=("mamba2", "attention", "mlgru"),
                             ssm=SSMConfig(d_state=8, head_dim=8, chunk_size=16))


def _with(cfg: Config, **train) -> Config:
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _one_device_batch(cfg: Config, index: int = 0):
  mesh = make_mesh(ParallelConfig(mesh_shape=(1,)), devices=jax.devices()[:1])
  return make_loader(cfg.data, batch_size=cfg.train.batch_size, seed=0,
                     split="train").global_batch(index, NamedSharding(mesh, PartitionSpec()))


def _grads(cfg: Config, state, graphdef, batch):
  return jax.jit(make_grad_step(cfg, graphdef))(state, batch)


@pytest.mark.parametrize("case", ["transformer", "vocab_blocks", "hybrid"])
@pytest.mark.parametrize("n", [2, 8])
def test_microbatched_gradients_equal_the_full_batch(case, n):
  cfg = TINY
  if case == "vocab_blocks":
    cfg = _with(cfg, loss_vocab_block=64)
  if case == "hybrid":
    cfg = dataclasses.replace(cfg, model=HYBRID)
  ts = init_state(cfg, jax.random.key(0))
  batch = _one_device_batch(cfg)
  weights = np.asarray(batch["weights"])
  # Microbatch j (rows j, j + n, ...) weighs differently from another.
  assert len({float(weights[j::n].sum()) for j in range(n)}) > 1
  g1, m1 = _grads(cfg, ts.state, ts.graphdef, batch)
  gn, mn = _grads(_with(cfg, microbatches=n), ts.state, ts.graphdef, batch)
  assert jax.tree.structure(gn) == jax.tree.structure(g1)
  np.testing.assert_allclose(mn["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(mn["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gn), jax.tree.leaves(g1), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _documents_config(tmp_path) -> Config:
  eos = 63
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, eos, 4000)
  tokens[rng.choice(4000, 120, replace=False)] = eos
  np.save(tmp_path / "t.npy", tokens.astype(np.int32))
  return dataclasses.replace(
      TINY, model=dataclasses.replace(HYBRID, vocab_size=64),
      data=DataConfig(source="npy", paths=(str(tmp_path / "t.npy"),), seq_len=32, vocab_size=64,
                      document_mask=True, eos_id=eos))


def test_document_masks_pass_through_the_microbatches(tmp_path):
  """Segment ids and restarting positions travel with their rows into each microbatch."""
  cfg = _documents_config(tmp_path)
  ts = init_state(cfg, jax.random.key(1))
  batch = _one_device_batch(cfg)
  assert int(batch["segment_ids"].max()) > 0
  g1, m1 = _grads(cfg, ts.state, ts.graphdef, batch)
  g4, m4 = _grads(_with(cfg, microbatches=4), ts.state, ts.graphdef, batch)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.multidevice
def test_microbatches_under_sequence_parallelism(tmp_path):
  """2 data x 4 seq devices, zigzag layout, document masks, 2 microbatches: the loss and
  gradients equal one device's plain step (the split keeps the sequence sharding)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg = _documents_config(tmp_path)
  ts = init_state(cfg, jax.random.key(1))
  batch = _one_device_batch(cfg)
  g1, m1 = _grads(cfg, ts.state, ts.graphdef, batch)
  par = ParallelConfig(strategy="sp", mesh_axes=("data", "seq"), mesh_shape=(2, 4),
                       sequence_layout="zigzag")
  mesh = make_mesh(par)
  state = jax.device_put(ts.state, NamedSharding(mesh, PartitionSpec()))
  batch = jax.device_put(batch, batch_sharding(mesh, "sp"))
  with sharding_context(mesh, "sp", sequence_layout="zigzag"):
    g2, m2 = _grads(_with(cfg, microbatches=2), state, ts.graphdef, batch)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eval_step_sums_equal_the_full_batch():
  ts = init_state(TINY, jax.random.key(0))
  batch = _one_device_batch(TINY)
  one = jax.jit(make_eval_step(ts.graphdef))(ts.state, batch)
  four = jax.jit(make_eval_step(ts.graphdef, 4))(ts.state, batch)
  assert int(four["answers"]) == int(one["answers"]) > 0
  assert int(four["correct"]) == int(one["correct"])
  assert float(four["weight"]) == float(one["weight"])
  np.testing.assert_allclose(four["loss_sum"], one["loss_sum"], rtol=1e-6)


def test_split_keeps_every_row_on_its_device():
  """Microbatch j = rows j, j+n, ...: with the batch in contiguous shares over 8 devices, the
  split moves no row between devices (no collective in the compiled program), and each
  microbatch stays split over all 8."""
  mesh = make_mesh(ParallelConfig(mesh_shape=(8,)))
  x = jax.device_put(jnp.arange(32 * 4).reshape(32, 4), batch_sharding(mesh, "dp"))
  with sharding_context(mesh, "dp"):
    fn = jax.jit(lambda x: microbatch.split_microbatches({"x": x}, 2)["x"])
    compiled = fn.lower(x).compile()
    out = fn(x)
  text = compiled.as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert op not in text, op
  np.testing.assert_array_equal(out[1], np.arange(32 * 4).reshape(32, 4)[1::2])
  assert {s.data.shape for s in out.addressable_shards} == {(2, 2, 4)}


@pytest.mark.multidevice
def test_fsdp_microbatched_steps_equal_one_device():
  """Three updates under 8-way FSDP with 2 microbatches of 8 rows equal the plain step on one
  device: the accumulator is sharded as the parameters it sums."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  from memx.train.step import state_shardings

  cfg = _with(TINY, batch_size=16)
  ts = init_state(cfg, jax.random.key(0))
  loader = make_loader(cfg.data, batch_size=16, seed=0, split="train")

  def run(cfg, par, devices):
    mesh = make_mesh(par, devices=devices)
    shardings = state_shardings(ts.state, mesh, par.strategy)
    state = jax.device_put(ts.state, shardings)
    with sharding_context(mesh, par.strategy):
      step = jax.jit(make_train_step(cfg, ts.graphdef), out_shardings=(shardings, None))
      losses = []
      for i in range(3):
        state, m = step(state, loader.global_batch(i, batch_sharding(mesh, par.strategy)))
        losses.append(float(m["loss"]))
    return state, losses

  one_state, one = run(cfg, ParallelConfig(mesh_shape=(1,)), jax.devices()[:1])
  fsdp = ParallelConfig(strategy="fsdp", mesh_axes=("data", "fsdp"), mesh_shape=(1, 8))
  mb_state, mb = run(_with(cfg, microbatches=2), fsdp, jax.devices())
  np.testing.assert_allclose(mb, one, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(one_state), jax.tree.leaves(mb_state), strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def test_microbatches_cut_the_compiled_step_memory():
  """Exact compiled bytes on CPU: at a fixed global batch, 4 microbatches hold a quarter of
  the activations (logits included) at a time."""
  cfg = dataclasses.replace(
      TINY, model=dataclasses.replace(TINY.model, d_model=64),
      data=DataConfig(source="corpus", seq_len=128), train=TrainConfig(steps=4, batch_size=16))
  ts = init_state(cfg, jax.random.key(0))
  batch = _one_device_batch(cfg)
  temp = {}
  for n in (1, 4):
    compiled = jax.jit(make_train_step(_with(cfg, microbatches=n), ts.graphdef)).lower(
        ts.state, batch).compile()
    temp[n] = compiled_memory(compiled)["temp_bytes"]
  logits = 16 * 128 * 264 * 4
  assert temp[1] > 2 * logits  # the logits and their gradient dominate the full step
  assert temp[4] < 0.45 * temp[1], temp


@pytest.mark.multidevice
def test_fsdp_microbatches_keep_the_parameters_sharded():
  """Under 8-way FSDP the parameters are loop-invariant in the microbatch loop: XLA hoisted
  their all-gathers out of it (every device then held them whole for the step: 51.9 MB of
  temporaries at n = 2 against 23.1-40.4 MB at n = 1). With the loop's barrier, 2 microbatches
  need less than 1."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  from memx.train.step import state_shardings

  par = ParallelConfig(strategy="fsdp", mesh_axes=("data", "fsdp"), mesh_shape=(1, 8))
  cfg = dataclasses.replace(
      TINY, model=ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4),
      data=DataConfig(source="corpus", seq_len=128), train=TrainConfig(steps=4, batch_size=16),
      parallel=par)
  mesh = make_mesh(par)
  ts = init_state(cfg, jax.random.key(0))
  shardings = state_shardings(ts.state, mesh, "fsdp")
  state = jax.device_put(ts.state, shardings)
  batch = make_loader(cfg.data, batch_size=16, seed=0, split="train").global_batch(
      0, batch_sharding(mesh, "fsdp"))
  temp = {}
  for n in (1, 2):
    with sharding_context(mesh, "fsdp"):
      compiled = jax.jit(make_train_step(_with(cfg, microbatches=n), ts.graphdef),
                         out_shardings=(shardings, None)).lower(state, batch).compile()
    temp[n] = compiled_memory(compiled)["temp_bytes"]
  assert temp[2] < temp[1], temp


def test_bad_microbatch_counts_are_refused_before_compute():
  with pytest.raises(ConfigError, match="train.microbatches = 0"):
    TrainConfig(microbatches=0)
  with pytest.raises(ConfigError, match="must divide train.batch_size = 8"):
    TrainConfig(batch_size=8, microbatches=3)
  with pytest.raises(ConfigError, match="integer"):
    TrainConfig(microbatches=True)
  # 8 rows in 2 microbatches of 4 cannot split over 8 data-parallel devices.
  if jax.device_count() >= 8:
    cfg = dataclasses.replace(_with(TINY, microbatches=2), parallel=ParallelConfig())
    with pytest.raises(ConfigError, match="batch_size / microbatches must be a multiple of 8"):
      prepare(cfg)


def test_a_run_resumes_with_another_microbatch_count(tmp_path):
  """The microbatch count is how a step runs, not what the run is: a run started with 1 may
  continue with 2 (e.g. on a smaller GPU), and trains on as the uninterrupted run does."""
  cfg = dataclasses.replace(_with(TINY, batch_size=16),
                            checkpoint=CheckpointConfig(every=2, keep=2))
  train(cfg, tmp_path / "full", progress=False)
  train(cfg, tmp_path / "resumed", progress=False, stop_at_step=2)
  train(_with(cfg, microbatches=2), tmp_path / "resumed", progress=False, resume=True)

  def losses(d):
    return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"]

  full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
  assert len(full) == len(resumed) == 4
  assert resumed[:2] == full[:2]
  np.testing.assert_allclose(resumed[2:], full[2:], rtol=1e-5)
