"""Fine-tuning entries in a sweep ("finetune.base": "@ENTRY"): they run after the entry they
fine-tune, their hash covers the base's, and a base retrained with another config reruns
them."""

import json
import pathlib

import pytest

from memx.errors import UserError
from memx.experiment.report import summary_table, write_report
from memx.experiment.sweep import run_sweep

EXPERIMENT = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_finetune.py"


def test_finetune_entries_follow_their_base(tmp_path, run_env, sweep_rows):
  sweep_dir, rows, _ = sweep_rows(EXPERIMENT, tmp_path)
  assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(("lora", "base", "full"),
                                                                    "done")
  lora = json.loads((sweep_dir / "lora" / "summary.json").read_text())
  full = json.loads((sweep_dir / "full" / "summary.json").read_text())
  assert 0 < lora["trainable_params"] < lora["params"] // 4
  assert full["trainable_params"] == full["params"]
  config = json.loads((sweep_dir / "lora" / "config.json").read_text())
  assert config["finetune"]["base"] == str(sweep_dir / "base")
  for name in rows:  # what the run recorded is what the index expects: the report trusts it
    prov = json.loads((sweep_dir / name / "provenance.json").read_text())
    assert prov["config_hash"] == rows[name]["config_hash"]
  assert rows["lora"]["config_hash"] != rows["full"]["config_hash"]
  table = summary_table(sweep_dir)
  assert "lora" in table and "full" in table
  header = next(line for line in write_report(sweep_dir).read_text().splitlines()
                if line.startswith("| run |"))
  assert "| params | trainable |" in header

  _, again, log = sweep_rows(EXPERIMENT, tmp_path)
  assert sum("finished earlier, skipped" in line for line in log) == 3

  run_env.setenv("MEMX_TEST_FT_BASE_SEED", "5")
  _, rerun, log = sweep_rows(EXPERIMENT, tmp_path)
  assert not any("skipped" in line for line in log), log
  for name in rows:
    assert rerun[name]["config_hash"] != rows[name]["config_hash"], name


def test_a_failed_base_fails_its_finetunes_without_training(tmp_path, run_env, sweep_rows):
  run_env.setenv("MEMX_TEST_FT_BASE_LR", "1e9")
  sweep_dir, rows, _ = sweep_rows(EXPERIMENT, tmp_path)
  assert rows["base"]["status"] == "failed"
  for name in ("lora", "full"):
    assert rows[name]["status"] == "failed" and "has not finished training" in rows[name]["error"]
    assert not (sweep_dir / name / "checkpoints").exists()


def test_the_hash_of_a_finetune_survives_another_spelling_of_the_workdir(tmp_path,
                                                                         monkeypatch):
  from memx.experiment.sweep import plan

  monkeypatch.chdir(tmp_path)
  hashes = [{spec.name: h for spec, h, _ in plan(str(EXPERIMENT), None, workdir)[1]}
            for workdir in ("runs", "./runs", str(tmp_path / "runs"))]
  assert hashes[0] == hashes[1] == hashes[2]


@pytest.mark.parametrize(("entries", "fragment"), [
    ("[('ft', {'finetune.base': '@base'}), ('base', {})]", "names no earlier training entry"),
    ("[('base', {}), ('a', {'finetune.base': '@base'}), ('b', {'finetune.base': '@a'})]",
     "earlier ones: base"),
    ("[('base', {}), ('wide', {'finetune.base': '@base', 'model.d_model': 32})]",
     "does not fit model"),
])
def test_a_bad_base_reference_is_rejected_before_anything_runs(tmp_path, entries, fragment):
  exp = tmp_path / "exp.py"
  exp.write_text(EXPERIMENT.read_text().replace(
      EXPERIMENT.read_text()[EXPERIMENT.read_text().index("def sweep"):],
      f"def sweep():\n  return {entries}\n"))
  with pytest.raises(UserError, match=fragment):
    run_sweep(str(exp), workdir=str(tmp_path / "runs"), progress=False, log=print)
  assert not (tmp_path / "runs").exists()
