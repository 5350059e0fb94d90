"""Training: learning on MQAR, NaN guard, determinism, exact resume, data parallel ≡ one device."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from memx.checkpoint import Checkpointer
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
from memx.errors import CheckpointMismatchError, ConfigError, NonFiniteLossError
from memx.parallel.mesh import make_mesh
from memx.train.loop import train
from memx.train.metrics import read_metrics
from memx.train.step import init_state, make_train_step

TINY = Config(
    model=ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=16, task="mqar", task_fraction=0.25, mqar_pairs=2),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=6, batch_size=8, log_every=1, eval_batches=1),
    checkpoint=CheckpointConfig(every=3, keep=3),
)


def _losses(run_dir: pathlib.Path) -> list[float]:
  return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_loss_falls_on_mqar():
  cfg = dataclasses.replace(
      TINY,
      model=dataclasses.replace(TINY.model, d_model=64),
      data=DataConfig(source="mqar", seq_len=20, mqar_pairs=4),
      optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
      train=TrainConfig(steps=250, batch_size=32, log_every=50, eval_batches=2),
  )
  summary = train(cfg, None, progress=False)
  # Chance on the answers is ln(128) ≈ 4.85 nats (values are drawn from 128 ids).
  assert summary["final_eval_loss"] < 3.5, summary
  assert summary["task_accuracy"] > 2 / 128, summary


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = dataclasses.replace(TINY, optim=OptimConfig(lr=1e8, warmup_steps=4, clip_norm=None),
                            train=dataclasses.replace(TINY.train, steps=12),
                            checkpoint=CheckpointConfig(every=1, keep=20))
  with pytest.raises(NonFiniteLossError) as info:
    train(cfg, tmp_path, progress=False)
  losses = _losses(tmp_path)
  first_bad = next(i + 1 for i, x in enumerate(losses) if not np.isfinite(x))
  assert info.value.step == first_bad
  assert f"step {first_bad}" in str(info.value)
  ckpt = Checkpointer(tmp_path / "checkpoints", cfg.checkpoint)
  # State k is saved only once the loss computed from it (step k+1's) is finite: the state
  # the NaN came from (first_bad - 1) is never saved, the one before it is.
  assert ckpt.latest_step() == first_bad - 2
  state = init_state(cfg, jax.random.key(0)).state
  restored, data_state, _ = ckpt.restore(state)
  assert data_state["step"] == first_bad - 2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored))
  assert not (tmp_path / "summary.json").exists()
  ckpt.close()


def test_same_config_and_seed_is_bit_identical(tmp_path):
  train(TINY, tmp_path / "a", progress=False)
  train(TINY, tmp_path / "b", progress=False)
  a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
  assert len(a) == TINY.train.steps and a == b
  other = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, seed=1))
  train(other, tmp_path / "c", progress=False)
  assert _losses(tmp_path / "c") != a


def _records(run_dir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without its timings."""
  return [{k: v for k, v in r.items() if k != "tokens_per_s"}
          for r in read_metrics(run_dir / "metrics.jsonl")]


def test_resume_is_exact(tmp_path):
  full = train(TINY, tmp_path / "full", progress=False)
  train(TINY, tmp_path / "split", progress=False, stop_at_step=3)
  assert len(_losses(tmp_path / "split")) == 3
  resumed = train(TINY, tmp_path / "split", progress=False, resume=True)
  # Every record, evaluations included (a stop used to log an eval the straight run has not).
  assert _records(tmp_path / "split") == _records(tmp_path / "full")
  assert resumed["final_eval_loss"] == full["final_eval_loss"]
  # The summary's mean of the last 10 losses spans the resume (it averaged 3, not 6).
  assert resumed["final_train_loss"] == full["final_train_loss"]
  # Final parameters are identical too.
  a = Checkpointer(tmp_path / "full" / "checkpoints", TINY.checkpoint)
  b = Checkpointer(tmp_path / "split" / "checkpoints", TINY.checkpoint)
  target = init_state(TINY, jax.random.key(0)).state
  sa, _, _ = a.restore(target, 6)
  sb, _, _ = b.restore(target, 6)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    np.testing.assert_array_equal(x, y)
  a.close()
  b.close()


def test_resume_with_incompatible_config_fails_clearly(tmp_path):
  train(TINY, tmp_path, progress=False, stop_at_step=3)
  wider = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, d_model=48))
  with pytest.raises(CheckpointMismatchError, match="another run.*model.d_model = 32 there, 48"):
    train(wider, tmp_path, progress=False, resume=True)
  # The checkpoint is untouched and still resumes with the right config; optimizer settings
  # may change on resume, clipping included (the optimizer state keeps one layout).
  no_clip = dataclasses.replace(TINY, optim=dataclasses.replace(TINY.optim, clip_norm=None))
  train(no_clip, tmp_path, progress=False, resume=True)
  assert len(_losses(tmp_path)) == TINY.train.steps


def test_run_writes_metrics_and_summary(tmp_path):
  summary = train(TINY, tmp_path, progress=False)
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["status"] == "done" and on_disk["steps"] == 6
  mem = on_disk["memory"]
  assert mem["argument_bytes"] > summary["param_bytes"] > 0
  assert mem["temp_bytes"] > 0
  assert summary["opt_state_bytes"] >= 2 * summary["param_bytes"]  # Adam's two moments
  assert summary["checkpoint_bytes"] > summary["param_bytes"]
  evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
  assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_resume_at_the_end_without_a_summary_rebuilds_it(tmp_path):
  # A run whose final checkpoint is complete but whose summary was never written (killed in
  # between): the resume runs no step and must summarise from metrics.jsonl, not report None.
  full = train(TINY, tmp_path, progress=False)
  (tmp_path / "summary.json").unlink()
  again = train(TINY, tmp_path, progress=False, resume=True)
  assert again["status"] == "done"
  for key in ("final_train_loss", "final_eval_loss", "task_accuracy"):
    assert again[key] == full[key] is not None, key


def test_sigterm_at_the_last_step_finishes_the_run(tmp_path, monkeypatch):
  # SIGTERM during the final evaluation: stopping there (saving step `end`, no summary) left a
  # resume nothing to run and a summary of Nones; the run finishes instead.
  import os
  import signal

  from memx.train import loop
  real = loop._evaluate

  def evaluate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
  monkeypatch.setattr(loop, "_evaluate", evaluate)
  summary = train(TINY, tmp_path, progress=False)
  assert summary["status"] == "done" and summary["final_eval_loss"] is not None
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == TINY.train.steps


def test_tensorboard_drops_an_abandoned_attempts_steps_on_resume(tmp_path):
  pytest.importorskip("tensorboardX")
  import shutil
  import struct

  from tensorboardX.proto import event_pb2
  train(TINY, tmp_path, progress=False)
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # resume from step 3: steps 4-6 run again
  (tmp_path / "summary.json").unlink()
  train(TINY, tmp_path, progress=False, resume=True)

  # TensorBoard's reading rule: a SessionLog START at step p hides earlier events at >= p.
  points = []
  for f in sorted((tmp_path / "tb").iterdir(), key=lambda f: f.stat().st_mtime_ns):
    buf, i = f.read_bytes(), 0
    while i < len(buf):
      (n,) = struct.unpack("<Q", buf[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(buf[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        points = [(tag, step, v) for tag, step, v in points if step < event.step]
      points += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  steps = [step for tag, step, _ in points if tag == "train/loss"]
  assert sorted(steps) == list(range(1, 7))


def test_batch_not_divisible_by_data_axis():
  cfg = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, batch_size=12))
  with pytest.raises(ConfigError, match="multiple of the data-parallel size 8"):
    train(cfg, None, progress=False)


def test_a_gpu_only_kernel_is_refused_before_the_run_starts(tmp_path):
  # It used to fail when the step compiled, after config.json and friends were written.
  from memx.kernels._dispatch import gpu_backend
  if gpu_backend():
    pytest.skip("checks the refusal on a backend without an NVIDIA GPU")
  for model in (dataclasses.replace(TINY.model, attn_impl="cudnn"),
                dataclasses.replace(TINY.model, mixers=("mamba2", "attention"),
                                    ssm=dataclasses.replace(TINY.model.ssm, impl="pallas_gpu",
                                                            head_dim=16))):
    with pytest.raises(ConfigError, match="runs only on an NVIDIA GPU"):
      train(dataclasses.replace(TINY, model=model), tmp_path / "r", progress=False)
  assert not (tmp_path / "r" / "config.json").exists()


def test_paths_without_a_file_source_are_refused():
  # The run used to train on the embedded corpus, the given file unread.
  from memx.train.loop import prepare
  cfg = dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, paths=("my.txt",)))
  with pytest.raises(ConfigError, match=r"data.paths = \('my.txt',\).*'text' and 'npy'"):
    prepare(cfg)


def test_resume_with_checkpointing_off_is_refused_when_checkpoints_exist(tmp_path):
  # It silently started over from step 1 beside the old checkpoints.
  train(TINY, tmp_path, progress=False, stop_at_step=3)
  off = dataclasses.replace(TINY, checkpoint=dataclasses.replace(TINY.checkpoint,
                                                                 enabled=False))
  with pytest.raises(ConfigError, match="checkpoint.enabled = false"):
    train(off, tmp_path, progress=False, resume=True)
  assert len(_losses(tmp_path)) == 3


def test_batch_multiple_counts_hosts_once(monkeypatch):
  # Two hosts × 4 devices: the data axis (8) already spans both hosts, so a batch of 8 (one
  # row per device, 4 per host) is valid; the check used to ask for a multiple of 8 × 2.
  from memx.train.loop import prepare
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert prepare(TINY).loader.local_batch(0)["inputs"].shape[0] == 4
  cfg = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, batch_size=12))
  with pytest.raises(ConfigError, match="host\\(s\\), i.e. of 8"):
    prepare(cfg)


@pytest.mark.multidevice
def test_data_parallel_step_matches_single_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg = TINY
  ts = init_state(cfg, jax.random.key(0))
  step = jax.jit(make_train_step(cfg, ts.graphdef))
  loader = make_loader(cfg.data, batch_size=8, seed=0, split="train")

  def run(devices):
    mesh = make_mesh(ParallelConfig(mesh_shape=(len(devices),)), devices=devices)
    state = jax.device_put(ts.state, NamedSharding(mesh, PartitionSpec()))
    metrics = []
    for i in range(3):
      state, m = step(state, loader.global_batch(i, NamedSharding(mesh, PartitionSpec("data"))))
      metrics.append(float(m["loss"]))
    return state, metrics

  one_state, one = run(jax.devices()[:1])
  dp_state, dp = run(jax.devices())
  np.testing.assert_allclose(one, dp, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(one_state), jax.tree.leaves(dp_state), strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)
  # The batch really was split: each device holds one row.
  batch = loader.global_batch(0, NamedSharding(make_mesh(ParallelConfig()), PartitionSpec("data")))
  assert {s.data.shape[0] for s in batch["inputs"].addressable_shards} == {1}


@pytest.mark.parametrize("tie", [False, True])
def test_blocked_vocab_loss_gives_the_same_step(tie):
  """train.loss_vocab_block > 0 (the logits never exist whole) changes memory, not results:
  loss and gradients equal the full-logits step's (vocab 264 = 4 blocks of 64 + a padded 8)."""
  from memx.train.step import make_grad_step

  base = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, tie_embeddings=tie))
  blocked = dataclasses.replace(base, train=dataclasses.replace(base.train, loss_vocab_block=64))
  ts = init_state(base, jax.random.key(0))
  one = NamedSharding(make_mesh(ParallelConfig(mesh_shape=(1,)), devices=jax.devices()[:1]),
                      PartitionSpec())
  batch = make_loader(base.data, batch_size=8, seed=0, split="train").global_batch(0, one)
  g_full, m_full = jax.jit(make_grad_step(base, ts.graphdef))(ts.state, batch)
  g_blk, m_blk = jax.jit(make_grad_step(blocked, ts.graphdef))(ts.state, batch)
  np.testing.assert_allclose(m_blk["loss"], m_full["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_full), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ConfigError, match="loss_vocab_block"):
    TrainConfig(loss_vocab_block=-1)


def test_a_run_reports_only_a_peak_it_raised(monkeypatch):
  """The allocator's peak is per process: a pipeline's earlier, larger run must not be
  reported as this run's peak."""
  import memx.train.loop as loop

  monkeypatch.setattr(loop, "peak_device_bytes", lambda: 100)
  assert loop._own_peak(100) is None  # an earlier computation peaked at least as high
  assert loop._own_peak(None) == 100
  monkeypatch.setattr(loop, "peak_device_bytes", lambda: 150)
  assert loop._own_peak(100) == 150
  monkeypatch.setattr(loop, "peak_device_bytes", lambda: None)  # CPU
  assert loop._own_peak(None) is None


@pytest.mark.parametrize("strategy, axes, shape", [("fsdp", ("data", "fsdp"), (1, -1)),
                                                   ("tp", ("data", "tensor"), (4, 2))])
def test_mid_run_checkpoints_under_a_sharded_strategy(tmp_path, strategy, axes, shape):
  """A mid-run save runs the step split in two (gradients, then update): under FSDP the update
  was compiled for sharded gradients the gradient program returned replicated (a sharding
  error at the first save). Saving mid-run must not change the run."""
  par = ParallelConfig(strategy=strategy, mesh_axes=axes, mesh_shape=shape)
  losses = []
  for every in (2, 100):  # saves at steps 2 and 4 (split steps), or only at the end (fused)
    cfg = dataclasses.replace(TINY, parallel=par, checkpoint=CheckpointConfig(every=every, keep=3))
    train(cfg, tmp_path / f"every{every}", progress=False)
    losses.append(_losses(tmp_path / f"every{every}"))
  assert losses[0] == losses[1]


def test_an_error_of_this_process_closes_checkpoints_without_collectives(tmp_path, monkeypatch):
  """An error on one process (here: writing metrics fails) closes the checkpointer with
  after_error (no barrier the other processes would never reach)."""
  import memx.train.loop as loop

  seen = []
  real_close = Checkpointer.close
  monkeypatch.setattr(Checkpointer, "close",
                      lambda self, after_error=False: (seen.append(after_error),
                                                       real_close(self, after_error=after_error)))

  def broken(self, record):
    raise OSError("output closed")
  monkeypatch.setattr(loop.MetricsWriter, "write", broken)
  with pytest.raises(OSError):
    train(TINY, tmp_path, progress=False)
  assert seen == [True]
