"""Checkpointing inside training: modes agree, resume is exact, crashes and SIGTERM are safe."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from memx.checkpoint import Checkpointer
from memx.checkpoint.manager import verify_manifest
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, TrainConfig
from memx.train.loop import train
from memx.train.metrics import read_metrics
from memx.train.step import init_state

TINY = Config(
    model=ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=16),
    train=TrainConfig(steps=6, batch_size=8, log_every=1, eval_batches=1),
    checkpoint=CheckpointConfig(every=2, keep=5),
)
EXP = str(pathlib.Path(__file__).parents[1] / "experiment" / "fixtures" / "tiny_sweep.py")


def _mode(mode):
  return dataclasses.replace(TINY, checkpoint=dataclasses.replace(TINY.checkpoint, mode=mode))


def _losses(run_dir):
  return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def _restore(run_dir, step, cfg=TINY):
  ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
  out = ckpt.restore(init_state(cfg, jax.random.key(0)).state, step)
  ckpt.close()
  return out


def test_every_mode_saves_the_same_states_and_trains_identically(tmp_path):
  for mode in ("sync", "async", "lazy"):
    summary = train(_mode(mode), tmp_path / mode, progress=False)
    assert summary["checkpoint_mode"] == mode and summary["checkpoint_blocking_s"] >= 0
  assert _losses(tmp_path / "sync") == _losses(tmp_path / "async") == _losses(tmp_path / "lazy")
  for step in (2, 4, 6):
    ref_state, ref_data, _ = _restore(tmp_path / "sync", step)
    for mode in ("async", "lazy"):
      state, data, _ = _restore(tmp_path / mode, step)
      assert data == ref_data == {"step": step}
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("mode", ["async", "lazy"])
def test_resume_is_exact_in_every_mode(tmp_path, mode):
  cfg = _mode(mode)
  train(cfg, tmp_path / "full", progress=False)
  train(cfg, tmp_path / "split", progress=False, stop_at_step=4)
  train(cfg, tmp_path / "split", progress=False, resume=True)
  assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
  a, _, _ = _restore(tmp_path / "full", 6)
  b, _, _ = _restore(tmp_path / "split", 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("damage", ["corrupt", "no_manifest", "no_summary"])
def test_resume_continues_past_a_damaged_newest_step(tmp_path, damage):
  """The newest step corrupt, or left without its manifest by a crash, or the run killed after
  its last checkpoint but before its summary: resume continues from the newest good step and
  saves the later steps again (Orbax's cached step list must not refuse them), ending where an
  uninterrupted run ends."""
  train(TINY, tmp_path / "full", progress=False)
  run = tmp_path / "run"
  if damage == "no_summary":
    train(TINY, run, progress=False)
    (run / "summary.json").unlink()
  else:
    train(TINY, run, progress=False, stop_at_step=4)
    step4 = run / "checkpoints" / "4"
    if damage == "corrupt":
      f = max((p for p in step4.rglob("*") if p.is_file() and p.name != "manifest.json"),
              key=lambda p: p.stat().st_size)
      data = bytearray(f.read_bytes())
      data[-1] ^= 0xFF
      f.write_bytes(bytes(data))
    else:
      (step4 / "manifest.json").unlink()
  summary = train(TINY, run, progress=False, resume=True)
  assert summary["steps"] == 6 and _losses(run) == _losses(tmp_path / "full")
  a, _, _ = _restore(tmp_path / "full", 6)
  b, _, _ = _restore(run, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_resume_below_the_checkpointed_step_is_refused(tmp_path):
  from memx.errors import ConfigError
  train(TINY, tmp_path, progress=False, stop_at_step=4)
  short = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, steps=3))
  with pytest.raises(ConfigError, match="resumes from is at step 4"):
    train(short, tmp_path, progress=False, resume=True)
  assert Checkpointer(tmp_path / "checkpoints", TINY.checkpoint).complete_steps() == [2, 4]


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
  first = train(TINY, tmp_path, progress=False)
  again = train(TINY, tmp_path, progress=False, resume=True)
  assert again == first == json.loads((tmp_path / "summary.json").read_text())


def _start(tmp_path, env, *extra):
  cmd = [sys.executable, "-m", "memx", "run", EXP, "--workdir", str(tmp_path), "--name", "r",
         "--set", "train.steps=100000", "--set", "train.log_every=1",
         "--set", "checkpoint.every=1", "--set", "checkpoint.keep=3", *extra]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_steps(ckpt_dir: pathlib.Path, n: int, proc, timeout=120.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"run exited early: {proc.stderr.read()}")
    steps = [p for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / "manifest.json").exists()]
    if len(steps) >= n:
      return
    time.sleep(0.02)
  pytest.fail("no checkpoints appeared")


@pytest.mark.parametrize("mode, delay", [("lazy", 0.0), ("async", 0.013), ("sync", 0.031)])
def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path, run_env, mode, delay):
  proc = _start(tmp_path, os.environ.copy(), "--set", f"checkpoint.mode={mode}")
  ckpt_dir = tmp_path / "r" / "checkpoints"
  try:
    _wait_for_steps(ckpt_dir, 2, proc)
    time.sleep(delay)  # saves happen every step: land somewhere inside one
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  ckpt = Checkpointer(ckpt_dir, CheckpointConfig(mode=mode))
  steps = ckpt.complete_steps()
  assert steps and all(verify_manifest(ckpt_dir / str(s)) is None for s in steps)
  latest = steps[-1]
  ckpt.close()
  # Resume from the newest complete checkpoint and finish two more steps.
  out = subprocess.run(
      [sys.executable, "-m", "memx", "run", EXP, "--workdir", str(tmp_path), "--name", "r",
       "--resume", "--set", f"train.steps={latest + 2}", "--set", "checkpoint.every=1",
       "--set", f"checkpoint.mode={mode}"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  records = read_metrics(tmp_path / "r" / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "train"][-3:] == [latest, latest + 1,
                                                                         latest + 2]


def test_sigterm_saves_the_current_step_and_stops(tmp_path, run_env):
  proc = _start(tmp_path, os.environ.copy())
  ckpt_dir = tmp_path / "r" / "checkpoints"
  _wait_for_steps(ckpt_dir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  assert "received SIGTERM: saved a checkpoint at step" in err and "Traceback" not in err
  stopped_at = int(err.split("at step ")[1].split(" ")[0])
  ckpt = Checkpointer(ckpt_dir, CheckpointConfig())
  assert ckpt.latest_step() == stopped_at
  train_steps = [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")
                 if r["split"] == "train"]
  assert max(train_steps) == stopped_at
  ckpt.close()
