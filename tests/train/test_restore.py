"""load_trained: a run directory gives back its config and the trained weights, bit for bit."""

import json

import jax
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
from memx.errors import UserError
from memx.experiment.rundir import write_config
from memx.train.loop import train
from memx.train.restore import find_run_dir, load_trained

CFG = Config(
    model=ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=16),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=4, batch_size=8, log_every=1, eval_batches=1),
    checkpoint=CheckpointConfig(every=2, keep=3, mode="sync"),
)


def test_load_trained_round_trip(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  write_config(run, CFG)
  train(CFG, run, progress=False)
  got = load_trained(run)
  assert got.cfg == CFG and got.step == 4 and got.run_dir == run
  # The restored weights give the same logits as a second restore of the same step.
  again = load_trained(run / "checkpoints", step=4)
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  np.testing.assert_array_equal(got.model(tokens), again.model(tokens))
  trained = jax.tree.leaves(nnx.state(got.model, nnx.Param))
  fresh = jax.tree.leaves(nnx.state(load_trained(run, step=2).model, nnx.Param))
  assert any(not np.array_equal(a, b) for a, b in zip(trained, fresh, strict=True))
  assert json.loads((run / "config.json").read_text())["model"]["d_model"] == 32


def test_load_trained_errors(tmp_path):
  with pytest.raises(UserError, match="not a memx run"):
    find_run_dir(tmp_path)
  write_config(tmp_path, CFG)
  with pytest.raises(UserError, match="no complete checkpoint"):
    load_trained(tmp_path)


def test_a_distillation_entry_points_to_its_last_stage(tmp_path):
  # A sweep's distillation entry holds the student's config and metrics, no checkpoints: the
  # error names the stage directory to load (it used to advise `memx run ... --resume`).
  entry = tmp_path / "student"
  entry.mkdir()
  write_config(entry, CFG)
  for k in (1, 2, 3):
    (entry / "distill" / f"stage{k}" / "checkpoints").mkdir(parents=True)
  with pytest.raises(UserError, match=r"distillation sweep entry.*distill/stage3"):
    load_trained(entry)
