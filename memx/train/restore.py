"""Load a trained model from a run directory (or its checkpoints/ folder) for evaluation.

Used by everything that starts from a trained model rather than training one: sparse-attention
planning (memx.sparse), distillation (memx.distill) and evaluation. The run's config.json says
how to build the model; the newest complete checkpoint (checksums verified, falling back past a
corrupt step as `Checkpointer.restore` does) gives its weights. Only the model is returned; the
optimizer state is restored alongside (the checkpoint layout is model + optimizer) and dropped.
"""

import dataclasses
import json
import pathlib

import jax
from flax import nnx

from memx.checkpoint import Checkpointer
from memx.config import Config, from_dict
from memx.errors import ConfigError, UserError
from memx.models.transformer import TransformerLM
from memx.train.step import abstract_state


@dataclasses.dataclass(frozen=True)
class Trained:
  """A restored model: its full config, the model, the checkpoint step and the run directory."""

  cfg: Config
  model: TransformerLM
  step: int
  run_dir: pathlib.Path


def find_run_dir(path: str | pathlib.Path) -> pathlib.Path:
  """The run directory for a run directory or its checkpoints/ (or checkpoints/STEP) path."""
  p = pathlib.Path(path)
  for candidate in (p, p.parent, p.parent.parent):
    if (candidate / "config.json").is_file():
      return candidate
  raise UserError(f"{path} is not a memx run: no config.json in it or above it. Give a run "
                  "directory written by `memx run` (it holds config.json and checkpoints/).")


def load_config(path: str | pathlib.Path) -> Config:
  run_dir = find_run_dir(path)
  try:
    return from_dict(json.loads((run_dir / "config.json").read_text()))
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f"{run_dir / 'config.json'} is not a valid memx config: {e}") from e


def load_trained(path: str | pathlib.Path, *, step: int | None = None) -> Trained:
  """Restores the model of the run at `path` (newest complete checkpoint, or `step`).

  Raises UserError when path holds no run or no complete checkpoint, and the checkpoint
  errors of `Checkpointer.restore` when the checkpoint does not fit the run's config.
  """
  run_dir = find_run_dir(path)
  cfg = load_config(run_dir)
  ckpt_dir = run_dir / "checkpoints"
  ckpt = Checkpointer(ckpt_dir, cfg.checkpoint) if ckpt_dir.is_dir() else None
  try:
    stages = sorted((run_dir / "distill").glob("stage*/checkpoints"))
    if ckpt is None and stages:  # a sweep's distillation entry: its student lives in a stage
      raise UserError(f"{run_dir} is a distillation sweep entry: it holds the student's config "
                      "and metrics, and its checkpoints are in the stages' run directories; "
                      f"give {stages[-1].parent} (the last stage) instead.")
    if ckpt is None or ckpt.latest_step() is None:
      why = ("it was trained with checkpoint.enabled = false: train it again with "
             "checkpointing on" if not cfg.checkpoint.enabled else
             "let it finish, or resume it (memx run ... --resume) until it saves one")
      raise UserError(f"run {run_dir} has no complete checkpoint under {ckpt_dir}; {why}.")
    if step is not None and step not in ckpt.complete_steps():
      raise UserError(f"run {run_dir} has no complete checkpoint at step {step}; complete "
                      f"steps: {ckpt.complete_steps()}.")
    ts = abstract_state(cfg, jax.random.key(0))
    state, _, restored_step = ckpt.restore(ts.state, step=step)
  finally:
    if ckpt is not None:
      ckpt.close()
  model, _ = nnx.merge(ts.graphdef, state)
  return Trained(cfg=cfg, model=model, step=restored_step, run_dir=run_dir)
