"""Test helpers for optimizers and train steps: training on one fixed batch, and the compiled
step's exact memory."""

import jax
from jax.sharding import NamedSharding, PartitionSpec

from memx.config import Config


def fixed_batch(cfg: Config) -> dict:
  """Batch 0 of cfg's training data (train.batch_size rows), on one device."""
  from memx.data import make_loader
  from memx.parallel.config import ParallelConfig
  from memx.parallel.mesh import make_mesh
  one = NamedSharding(make_mesh(ParallelConfig(mesh_shape=(1,)), devices=jax.devices()[:1]),
                      PartitionSpec())
  return make_loader(cfg.data, batch_size=cfg.train.batch_size, seed=0,
                     split="train").global_batch(0, one)


def fixed_batch_losses(cfg: Config) -> list[float]:
  """The losses of train.steps updates on `fixed_batch(cfg)`, the step donated as the loop
  runs it (a state whose leaves share a buffer cannot be)."""
  from memx.train.step import init_state, make_train_step
  batch = fixed_batch(cfg)
  ts = init_state(cfg, jax.random.key(0))
  step = jax.jit(make_train_step(cfg, ts.graphdef), donate_argnums=0)
  state, losses = ts.state, []
  for _ in range(cfg.train.steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return losses


def step_temp_bytes(cfg: Config) -> tuple[int, int]:
  """(XLA's temporary bytes of cfg's compiled train step on its mesh, the parameters' bytes)."""
  from memx.benchmark import compile_train_step
  from memx.train.memory import compiled_memory
  compiled, state, _ = compile_train_step(cfg)
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state[0]))
  return compiled_memory(compiled)["temp_bytes"], params


def straight_and_resumed(cfg: Config, root, stop_at: int):
  """Trains cfg twice under root: "full" straight through, "split" stopped after stop_at
  steps and resumed. Returns (full's summary, [train records of full, of split], [final
  checkpointed states of full, of split])."""
  from memx.checkpoint import Checkpointer
  from memx.train.loop import train
  from memx.train.metrics import read_metrics
  from memx.train.step import init_state

  summary = train(cfg, root / "full", progress=False)
  train(cfg, root / "split", progress=False, stop_at_step=stop_at)
  train(cfg, root / "split", progress=False, resume=True)
  records, states = [], []
  target = init_state(cfg, jax.random.key(0)).state
  for name in ("full", "split"):
    records.append([r for r in read_metrics(root / name / "metrics.jsonl")
                    if r["split"] == "train"])
    ck = Checkpointer(root / name / "checkpoints", cfg.checkpoint)
    states.append(ck.restore(target, cfg.train.steps)[0])
    ck.close()
  return summary, records, states
