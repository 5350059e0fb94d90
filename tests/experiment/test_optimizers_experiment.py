"""experiments/optimizers/ablation.py: its entries validate, and its tiny variant trains each
optimizer with the state sizes the report compares."""

import json

import pytest

from memx.experiment import loading, sweep
from memx.experiment.runner import RunSpec, run

EXPERIMENT = "experiments/optimizers/ablation.py"


@pytest.mark.entry
def test_entries_validate_and_the_tiny_runs_train(tmp_path):
  module = loading.load_module(EXPERIMENT)
  for variant in loading.variants(module):
    _, specs = sweep.plan(EXPERIMENT, variant, str(tmp_path / "plan"))
    assert len(specs) == len(module.SWEEP)
  state = {}
  for name, overrides in module.SWEEP:
    if name not in ("adamw", "adafactor", "adamw-mb4"):
      continue
    run(RunSpec(EXPERIMENT, "tiny", overrides, str(tmp_path), name), progress=False)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["status"] == "done" and summary["final_eval_loss"] is not None
    state[name] = summary["opt_state_bytes"]
  assert state["adafactor"] < 0.3 * state["adamw"] == 0.3 * state["adamw-mb4"]
