"""The README's main job: the demo experiment's tiny variant trains, deterministically."""

import json

import pytest

from memx.experiment import loading
from memx.experiment.runner import RunSpec, run
from memx.train.metrics import read_metrics

DEMO = "experiments/demo/ablation.py"


def test_demo_sweep_entries_all_validate():
  module = loading.load_module(DEMO)
  names = []
  for variant in loading.variants(module):
    for name, overrides in loading.sweep_entries(module):
      loading.build_config(module, variant, overrides)
      names.append(name)
  assert len(set(names)) == len(loading.sweep_entries(module)) >= 4


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
