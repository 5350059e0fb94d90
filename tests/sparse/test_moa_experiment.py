"""experiments/moa/pipeline.py end to end at its tiny size (slow: trains, profiles, evaluates)."""

import json

import pytest

from memx.experiment import loading

PIPELINE = "experiments/moa/pipeline.py"


def test_variants_validate():
  module = loading.load_module(PIPELINE)
  for variant in loading.variants(module):
    loading.build_config(module, variant, {})


@pytest.mark.slow
def test_tiny_pipeline(tmp_path):
  module = loading.load_module(PIPELINE)
  assert module.main(["--variant", "tiny", "--workdir", str(tmp_path)]) == 0
  sweep = tmp_path / "moa-tiny"
  summary = json.loads((sweep / "moa_summary.json").read_text())
  assert {"dense", "moa50", "uniform50"} <= set(summary)
  assert summary["moa50"]["density@max"] <= 0.5 + 1e-9
  assert "## Evaluations" in (sweep / "report.md").read_text()
