"""The README's main job: the demo experiment's tiny variant trains, deterministically."""

import json

import pytest

from memx.experiment import loading, sweep
from memx.experiment.runner import RunSpec, run
from memx.train.metrics import read_metrics

DEMO = "experiments/demo/ablation.py"


def test_demo_sweep_entries_all_validate(tmp_path):
  module = loading.load_module(DEMO)
  for variant in loading.variants(module):
    _, specs = sweep.plan(DEMO, variant, str(tmp_path))  # training and distillation entries
    assert len({spec.name for spec, *_ in specs}) == len(specs) >= 4


@pytest.mark.entry
def test_demo_is_bit_identical_across_runs(tmp_path):
  losses = []
  for name in ("a", "b"):
    spec = RunSpec(DEMO, "tiny", {"model.attn_window": 8, "model.attn_sinks": 2},
                   str(tmp_path), name)
    run(spec, progress=False)
    losses.append([r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")])
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["status"] == "done"
  assert losses[0] == losses[1] and len(losses[0]) > 0
