"""Shared fixtures: one tiny trained teacher run per session, and fast distillation settings."""

import dataclasses

import pytest

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)
from memx.distill.config import DistillConfig, StudentConfig
from memx.experiment.rundir import write_config
from memx.train.loop import train

# GQA teacher: 2 query heads of dim 8 share one key/value head.
TEACHER = Config(
    model=ModelConfig(vocab_size=264, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1),
    data=DataConfig(source="corpus", seq_len=16),
    optim=OptimConfig(lr=1e-2, warmup_steps=2),
    train=TrainConfig(steps=30, batch_size=8, log_every=10, eval_batches=1),
    checkpoint=CheckpointConfig(every=30, keep=1, mode="sync"),
)


def fast_distill(steps: int = 3, **changes) -> DistillConfig:
  """A hybrid student (layer 0 kept), every stage `steps` steps on batches of 4, one eval
  batch: the same shapes everywhere, so the tests share their compiled programs."""
  base = DistillConfig(student=StudentConfig(kind="hybrid", every=2))
  stages = {f"stage{i}": dataclasses.replace(base.stage(i), steps=steps, batch_size=4,
                                             log_every=1, checkpoint_every=steps, warmup_steps=0)
            for i in (1, 2, 3)}
  return dataclasses.replace(base, eval_batches=1, **{**stages, **changes})


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("teacher") / "run"
  run.mkdir()
  write_config(run, TEACHER)
  train(TEACHER, run, progress=False)
  return run


@pytest.fixture
def teacher_cfg() -> Config:
  return TEACHER


@pytest.fixture
def fast():
  """fast_distill(steps, **changes): a DistillConfig sized for tests."""
  return fast_distill


@pytest.fixture(autouse=True)
def _fast_compiles(monkeypatch):
  """Distillation programs compile with FAST_CPU_COMPILE in tests (about 2.4x faster)."""
  from memx.distill import stages
  from memx.kernels._testing import FAST_CPU_COMPILE
  monkeypatch.setattr(stages, "COMPILER_OPTIONS", FAST_CPU_COMPILE)
