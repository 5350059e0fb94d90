"""A tiny dense run trained once per test session: the model every sparse test profiles."""

import pytest

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.experiment.rundir import write_config
from memx.train.loop import train

TINY_RUN = Config(
    model=ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
    data=DataConfig(source="corpus", seq_len=64, task="mqar", task_fraction=0.25,
                    mqar_pairs=4),
    optim=OptimConfig(lr=1e-2, warmup_steps=10),
    train=TrainConfig(steps=120, batch_size=16, log_every=40, eval_batches=1),
    checkpoint=CheckpointConfig(every=120, keep=1, mode="sync"),
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("sparse") / "dense"
  run.mkdir()
  write_config(run, TINY_RUN)
  train(TINY_RUN, run, progress=False)
  return run
