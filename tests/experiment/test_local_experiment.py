"""experiments/local/ablation.py: its entries validate, and its tiny variant trains backprop and
local learning (AugLocal, MAN) with the model's parameter count and per-group losses logged."""

import json

import pytest

from memx.experiment import loading, sweep
from memx.experiment.runner import RunSpec, run
from memx.train.metrics import read_metrics

EXPERIMENT = "experiments/local/ablation.py"


@pytest.mark.entry
def test_entries_validate_and_the_tiny_runs_train(tmp_path):
  module = loading.load_module(EXPERIMENT)
  for variant in loading.variants(module):
    _, specs = sweep.plan(EXPERIMENT, variant, str(tmp_path / "plan"))
    assert len(specs) == len(module.SWEEP)
  summaries = {}
  for name, overrides in module.SWEEP:
    if name not in ("backprop", "local4-d1", "local4-d1-man"):
      continue
    run(RunSpec(EXPERIMENT, "tiny", overrides, str(tmp_path), name), progress=False)
    summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert summaries[name]["status"] == "done"
    assert summaries[name]["final_eval_loss"] is not None
  # The auxiliary networks are training-only: the model's parameter count is backprop's.
  assert summaries["local4-d1"]["params"] == summaries["backprop"]["params"]
  records = [r for r in read_metrics(tmp_path / "local4-d1-man" / "metrics.jsonl")
             if r["split"] == "train"]
  assert {"local_loss_0", "local_loss_1", "local_loss_2"} <= set(records[-1])
