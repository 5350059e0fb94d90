"""experiments/matmulfree: its configs validate; the pipeline end to end at its tiny size (slow)."""

import json

import pytest

from memx.experiment import loading

COMPARE = "experiments/matmulfree/compare.py"
PIPELINE = "experiments/matmulfree/pipeline.py"


def test_sweep_configs_validate():
  module = loading.load_module(COMPARE)
  names = [name for name, _ in loading.sweep_entries(module)]
  assert {"transformer-d64", "matmulfree-d192", "mlgru-fp-d128"} <= set(names)
  for variant in loading.variants(module):
    for _, overrides in module.entries(variant):
      loading.build_config(module, variant, overrides)


@pytest.mark.slow
def test_tiny_pipeline(tmp_path, load_script):
  module = load_script(PIPELINE)
  assert module.main(["--variant", "tiny", "--workdir", str(tmp_path)]) == 0
  sweep = tmp_path / "matmulfree-tiny"
  summary = json.loads((sweep / "matmulfree_summary.json").read_text())
  mf, tf = summary["runs"]["matmulfree-d64"], summary["runs"]["transformer-d64"]
  assert mf["decode state bytes @64k"] < 1e-3 * tf["decode state bytes @64k"]
  assert mf["serving weight bytes"] < tf["serving weight bytes"]
  assert mf["saved activation bytes"] < tf["saved activation bytes"]
  assert len(summary["claims"]) == 1 and summary["claims"][0].startswith("d64:")
  assert "## Evaluations" in (sweep / "report.md").read_text()
