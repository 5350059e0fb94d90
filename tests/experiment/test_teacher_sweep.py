"""Distillation entries in a sweep ("teacher.run": "@ENTRY", memx.train.kd): they run after
their teacher (a teacher that is itself a fine-tune: a phase later), their hash covers the
teacher's, a teacher retrained with another config reruns them, and a bad reference is refused
before anything runs."""

import json
import pathlib

import pytest

from memx.errors import UserError
from memx.experiment.sweep import run_sweep
from memx.train.metrics import read_metrics

EXPERIMENT = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_teacher.py"


def test_distilled_entries_follow_their_teachers(tmp_path, run_env, sweep_rows):
  sweep_dir, rows, log = sweep_rows(EXPERIMENT, tmp_path)
  assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(
      ("big", "ft", "small", "small_of_ft"), "done")
  started = [line.split("]")[1].split(":")[0].strip() for line in log if "running" in line]
  assert started.index("small_of_ft") > started.index("ft") > started.index("big")
  config = json.loads((sweep_dir / "small_of_ft" / "config.json").read_text())
  assert config["teacher"]["run"] == str(sweep_dir / "ft")
  records = [r for r in read_metrics(sweep_dir / "small" / "metrics.jsonl")
             if r["split"] == "train"]
  assert all(r["kd_divergence"] > 0 for r in records)
  for name in rows:
    prov = json.loads((sweep_dir / name / "provenance.json").read_text())
    assert prov["config_hash"] == rows[name]["config_hash"]

  run_env.setenv("MEMX_TEST_KD_TEACHER_SEED", "5")
  _, rerun, log = sweep_rows(EXPERIMENT, tmp_path)
  assert not any("skipped" in line for line in log), log
  for name in rows:
    assert rerun[name]["config_hash"] != rows[name]["config_hash"], name


@pytest.mark.parametrize(("entries", "fragment"), [
    ("[('s', {'teacher.run': '@big'}), ('big', {})]", "names no earlier training entry"),
    ("[('big', {}), ('s', {'teacher.run': '@big', 'model.vocab_size': 300})]",
     "same vocabulary"),
])
def test_a_bad_teacher_reference_is_rejected_before_anything_runs(tmp_path, entries, fragment):
  text = EXPERIMENT.read_text()
  exp = tmp_path / "exp.py"
  exp.write_text(text.replace(text[text.index("def sweep"):],
                              f"def sweep():\n  return {entries}\n"))
  with pytest.raises(UserError, match=fragment):
    run_sweep(str(exp), workdir=str(tmp_path / "runs"), progress=False, log=print)
  assert not (tmp_path / "runs").exists()
