"""Shared helpers of the experiment tests."""

import pytest

from memx.experiment.index import RunIndex
from memx.experiment.sweep import run_sweep


@pytest.fixture
def sweep_rows():
  """(experiment path, workdir) → (sweep dir, {entry name: index row}, the sweep's log lines)
  of one `run_sweep` call."""
  def run(experiment, workdir):
    log: list[str] = []
    sweep_dir = run_sweep(str(experiment), workdir=str(workdir), progress=False,
                          log=log.append)
    index = RunIndex(sweep_dir / "index.sqlite")
    try:
      rows = {r["name"]: r for r in index.rows()}
    finally:
      index.close()
    return sweep_dir, rows, log
  return run
