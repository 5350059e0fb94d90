"""experiments/documents: configs validate; the pipeline end to end at its tiny size (slow)."""

import json

import pytest

from memx.experiment import loading

COMPARE = "experiments/documents/compare.py"
PIPELINE = "experiments/documents/pipeline.py"


def test_sweep_configs_validate_and_differ_only_in_the_mask():
  module = loading.load_module(COMPARE)
  for variant in loading.variants(module):
    cfgs = {name: loading.build_config(module, variant, overrides)
            for name, overrides in module.entries(variant)}
    for family in ("transformer", "mamba2"):
      plain, masked = cfgs[f"{family}-plain"], cfgs[f"{family}-docmask"]
      assert plain.data.text_separator == "\n\n" and masked.data.document_mask
      assert plain.model == masked.model and not plain.data.document_mask


@pytest.mark.slow
def test_tiny_pipeline(tmp_path, load_script):
  module = load_script(PIPELINE)
  assert module.main(["--variant", "tiny", "--workdir", str(tmp_path)]) == 0
  sweep = tmp_path / "documents-tiny"
  summary = json.loads((sweep / "documents_summary.json").read_text())
  names = {"transformer-plain", "transformer-docmask", "mamba2-plain", "mamba2-docmask"}
  assert set(summary["runs"]) == names | {f"{n}-shuffled" for n in names}
  for cols in summary["runs"].values():
    assert cols["later-document tokens"] > 0
    # The views differ on later documents (the masks take effect), not on whole rows' scale.
    assert cols["later documents, apart"] != cols["later documents, joined"]
  assert len(summary["claims"]) == 4
  assert "## Evaluations" in (sweep / "report.md").read_text()
