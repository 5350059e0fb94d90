"""experiments/distill/pipeline.py: its configs validate; end to end at its tiny size (slow)."""

import json

import pytest

from memx.distill.config import DistillConfig
from memx.experiment import loading

PIPELINE = "experiments/distill/pipeline.py"


def test_variants_validate():
  module = loading.load_module(PIPELINE)
  for variant in loading.variants(module):
    loading.build_config(module, variant, {})
    assert isinstance(module.distill_config(variant), DistillConfig)


@pytest.mark.slow
def test_tiny_pipeline(tmp_path):
  module = loading.load_module(PIPELINE)
  assert module.main(["--variant", "tiny", "--workdir", str(tmp_path)]) == 0
  root = tmp_path / "distill-tiny"
  results = json.loads((root / "results.json").read_text())
  assert set(results["evaluation"]) == {
      "teacher", "linear", "hybrid4", "linear-skip-stage1", "linear-skip-seeding",
      "mamba2-scratch", "linear (seeded, untrained)", "hybrid4 (seeded, untrained)"}
  assert set(results["stages"]["linear-skip-stage1"]) == {"2", "3"}
  assert "## Prefill and decode vs length" in (root / "report.md").read_text()
  # Each trained model's evaluation in memx's format, which `memx report` picks up.
  record = json.loads((root / "hybrid4" / "stage3" / "evaluations" / "distill.json").read_text())
  assert {"eval_loss", "kl", "agreement", "prefill_ms@max"} <= set(record["columns"])
  assert (root / "teacher" / "evaluations" / "distill.json").is_file()
