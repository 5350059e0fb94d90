"""experiments/moa/pipeline.py end to end at its tiny size (slow: trains, profiles, evaluates)."""

import importlib.util
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
  assert {"dense", "moa50", "uniform50", "limit50"} <= set(summary)
  assert summary["moa50"]["density@max"] <= 0.5 + 1e-9
  assert "## Evaluations" in (sweep / "report.md").read_text()
  # moa50 is the validated plan; moa50-search the single search it was chosen against.
  assert "moa50-search" in summary
  plan = json.loads((sweep / "dense" / "sparse" / "moa50.json").read_text())
  assert plan["meta"]["validation"]["length"] == 96
  spec = importlib.util.spec_from_file_location("head_ablation", "experiments/moa/head_ablation.py")
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  assert ablation.main(["--workdir", str(tmp_path), "--sweep", "moa-tiny", "--length", "128",
                        "--max-dense", "1", "--budget", "0.5"]) == 0
  heads = json.loads((sweep / "head_ablation.json").read_text())
  assert len(heads["single_head_window16"]) == 2 * 4 and 0 <= heads["dense"]["exact_match"] <= 1
  assert set(heads["k_dense"]) <= {"0", "1"} and heads["k_dense"]


def test_uniform_limit_is_the_first_length_past_its_effective_context():
  module = loading.load_module(PIPELINE)
  uni = {"effective ctx": 128, "passkey": {"128": 1.0, "192": 0.4, "256": 0.0}}
  assert module.uniform_limit(uni, (128, 192, 256)) == {"length": 192, "accuracy": 0.4}
  never = {"effective ctx": None, "passkey": {"128": 0.2, "256": 0.0}}
  assert module.uniform_limit(never, (256, 128)) == {"length": 128, "accuracy": 0.2}
  always = {"effective ctx": 256, "passkey": {"128": 1.0, "256": 1.0}}  # no limit in range
  assert module.uniform_limit(always, (128, 256)) == {"length": 256, "accuracy": 1.0}


def test_bad_guard_tolerance_is_refused_before_training(tmp_path, capsys):
  pipeline = loading.load_module(PIPELINE)
  for bad in ("-1", "nan"):
    with pytest.raises(SystemExit) as e:
      pipeline.main(["--variant", "tiny", "--workdir", str(tmp_path), "--guard-tolerance", bad])
    assert e.value.code == 2 and "--guard-tolerance" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
