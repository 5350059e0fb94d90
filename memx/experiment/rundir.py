"""Run directories: config.json and provenance.json (git, versions, devices, seeds, data)."""

import datetime
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import jax

from memx._io import write_json
from memx.config import Config, to_dict
from memx.errors import UserError
from memx.train.finetune import run_hash

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "chex", "einops")


def check(run_dir: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
  """Refuses to clobber a run directory that holds a run (without --resume or --overwrite).
  Reads only: every process of a multi-process run checks (their filesystem is shared), so
  all of them stop together rather than leaving the others waiting in collectives."""
  run_dir = pathlib.Path(run_dir)
  if run_dir.exists() and any(run_dir.iterdir()) and not resume and not overwrite:
    raise UserError(f"run directory {str(run_dir)!r} already holds a run. Pass --resume to "
                    "continue it, --overwrite to start over, or choose another --name/--workdir.")


def prepare(run_dir: pathlib.Path, *, resume: bool, overwrite: bool) -> pathlib.Path:
  """Creates (or reuses, when resuming) a run directory; refuses to clobber a finished one."""
  run_dir = pathlib.Path(run_dir)
  check(run_dir, resume=resume, overwrite=overwrite)
  if run_dir.exists() and any(run_dir.iterdir()) and not resume:
    shutil.rmtree(run_dir)
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"cannot write to run directory {str(run_dir)!r} ({e.strerror}); choose a "
                    "writable --workdir.") from None
  return run_dir


def git_info(start: pathlib.Path) -> dict:
  def git(*args):
    return subprocess.run(["git", *args], cwd=start, capture_output=True, text=True, timeout=10)
  try:
    sha = git("rev-parse", "HEAD")
    if sha.returncode != 0:
      return {"sha": None, "dirty": None}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    return {"sha": sha.stdout.strip(), "dirty": dirty}
  except (OSError, subprocess.SubprocessError):
    return {"sha": None, "dirty": None}


def provenance(cfg: Config, *, seeds: dict, data_hash: str, mesh_shape: dict) -> dict:
  versions = {}
  for p in PACKAGES:
    try:
      versions[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      versions[p] = None
  devices = jax.devices()
  return {
      "time": datetime.datetime.now(datetime.UTC).isoformat(),
      "config_hash": run_hash(cfg),
      "git": git_info(pathlib.Path(__file__).resolve().parent),
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "host": platform.node(),
      "packages": versions,
      "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                  "count": len(devices), "local_count": jax.local_device_count(),
                  "process_count": jax.process_count()},
      "mesh": mesh_shape,
      "seeds": seeds,
      "data_hash": data_hash,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def write_config(run_dir: pathlib.Path, cfg: Config) -> None:
  write_json(pathlib.Path(run_dir) / "config.json", to_dict(cfg))
