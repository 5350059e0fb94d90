"""One run: experiment file + variant + overrides → run directory → train → summary."""

import dataclasses
import logging
import pathlib
from typing import Any

import jax
from jax.experimental import multihost_utils

from memx._io import write_json
from memx.config import Config
from memx.errors import UserError
from memx.experiment import loading, rundir
from memx.parallel.mesh import maybe_initialize_distributed
from memx.train.loop import has_checkpoint, prepare, stored_config_differences, train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything needed to (re)start one run; picklable, so SLURM jobs can carry it."""

  experiment: str
  variant: str | None
  overrides: dict[str, Any]
  workdir: str
  name: str
  plan: str | None = None  # a sparse-attention plan file (memx.sparse.plan) applied to the model


def default_name(experiment: str, variant: str | None) -> str:
  stem = pathlib.Path(experiment).stem
  return f"{stem}-{variant}" if variant else stem


def resolve_config(spec: RunSpec) -> Config:
  module = loading.load_module(pathlib.Path(spec.experiment))
  cfg = loading.build_config(module, spec.variant, spec.overrides)
  if spec.plan is not None:
    from memx.sparse.plan import Plan, apply_plan
    cfg = apply_plan(cfg, Plan.load(spec.plan))
  return cfg


def is_distill_entry(overrides: dict[str, Any]) -> bool:
  """Whether a sweep entry distils another entry's run (distill.* keys) instead of training."""
  return any(k.startswith("distill.") for k in overrides)


def run_current(spec: RunSpec, *, progress: bool = True) -> dict:
  """Runs spec, reusing what its directory holds (a finished run's summary, a checkpoint to
  continue) only when that was made with this very config; another config (an edited
  experiment file) trains the run again from scratch. Experiment pipelines use this as their
  cache of finished steps."""
  run_dir = pathlib.Path(spec.workdir) / spec.name
  diffs = stored_config_differences(run_dir, resolve_config(spec))
  same = diffs == "" or (diffs is None and not (run_dir.exists() and any(run_dir.iterdir())))
  return run(spec, resume=same, overwrite=not same, progress=progress)


def run(spec: RunSpec, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        stop_at_step: int | None = None) -> dict:
  """Validates everything before any compute, writes config/provenance, trains, summarises."""
  if is_distill_entry(spec.overrides):
    from memx.distill import sweep_entry
    module = loading.load_module(pathlib.Path(spec.experiment))
    return sweep_entry.run(spec, module, resume=resume, overwrite=overwrite, progress=progress)
  loading.check_run_name(spec.name, "--name")
  if resume and overwrite:
    raise UserError("--resume continues a run and --overwrite deletes it: give one of them.")
  cfg = resolve_config(spec)
  maybe_initialize_distributed()
  run_dir = pathlib.Path(spec.workdir) / spec.name
  # Every check that can fail on user input runs before the run directory is touched.
  # (a resume restores its own checkpoint: a fine-tune's base run need not be there)
  setup = prepare(cfg, resuming=resume and cfg.checkpoint.enabled and has_checkpoint(run_dir))
  rundir.check(run_dir, resume=resume, overwrite=overwrite)  # every process: all stop together
  multi = jax.process_count() > 1
  if multi:  # no process may see the directory after process 0 starts replacing it
    multihost_utils.sync_global_devices("memx-rundir-checked")
  if jax.process_index() == 0:
    rundir.prepare(run_dir, resume=resume, overwrite=overwrite)
  if multi:  # nor write into it (checkpoints/) before process 0 has cleared it
    multihost_utils.sync_global_devices("memx-rundir-ready")

  def write_run_files():
    # Only once training is accepted: a resume refused (another run's checkpoint, fewer steps)
    # or already finished leaves the run's config and provenance those of what it trained.
    if jax.process_index() == 0:
      rundir.write_config(run_dir, cfg)
      write_json(run_dir / "provenance.json", rundir.provenance(
          cfg, seeds={"seed": cfg.train.seed, "data_seed": setup.seeds.data_seed},
          data_hash=setup.loader.data_hash, mesh_shape=dict(setup.mesh.shape)))

  return train(cfg, run_dir, resume=resume, stop_at_step=stop_at_step, progress=progress,
               name=spec.name, setup=setup, on_start=write_run_files)
