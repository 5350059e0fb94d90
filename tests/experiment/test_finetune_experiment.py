"""experiments/finetune/lora.py: its entries validate (fine-tunes name the base entry), and its
tiny variant trains the base, then LoRA and QLoRA from it, with the state sizes the report
compares."""

import json

import pytest

from memx.experiment import loading, sweep
from memx.experiment.runner import RunSpec, run

EXPERIMENT = "experiments/finetune/lora.py"


@pytest.mark.entry
def test_entries_validate_and_the_tiny_runs_train(tmp_path):
  module = loading.load_module(EXPERIMENT)
  for variant in loading.variants(module):
    sweep_dir, specs = sweep.plan(EXPERIMENT, variant, str(tmp_path / "plan"))
    assert len(specs) == len(module.SWEEP)
    bases = {s.overrides.get("finetune.base") for s, _, _ in specs} - {None}
    assert bases == {str(sweep_dir / "base")}
  entries = dict(module.SWEEP)
  summaries = {}
  for name in ("base", "lora-r8", "qlora-r8"):
    overrides = {**entries[name]}
    if overrides.get("finetune.base") == "@base":
      overrides["finetune.base"] = str(tmp_path / "base")
    run(RunSpec(EXPERIMENT, "tiny", overrides, str(tmp_path), name), progress=False)
    summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert summaries[name]["status"] == "done"
  base, lora, qlora = summaries["base"], summaries["lora-r8"], summaries["qlora-r8"]
  assert lora["trainable_params"] == qlora["trainable_params"] < base["params"] / 5
  assert lora["params"] == qlora["params"] == base["params"] + lora["trainable_params"]
  assert qlora["param_bytes"] < 0.5 * lora["param_bytes"]
  assert lora["opt_state_bytes"] < 0.3 * base["opt_state_bytes"]
