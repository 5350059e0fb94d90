"""A sweep entry that distils another entry's run: validation, ordering, the report row."""

import json

import pytest

from memx.errors import UserError
from memx.experiment import sweep
from memx.experiment.index import RunIndex

EXPERIMENT = '''
import dataclasses
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

def config(variant="base"):
  return Config(
      model=ModelConfig(vocab_size=264, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1),
      data=DataConfig(source="corpus", seq_len=16),
      optim=OptimConfig(lr=1e-2, warmup_steps=2),
      train=TrainConfig(steps=4, batch_size=8, log_every=2, eval_batches=1),
      checkpoint=CheckpointConfig(every=4, keep=1, mode="sync"))

FAST = {f"distill.stage{i}.{k}": v for i in (1, 2, 3)
        for k, v in (("steps", 2), ("batch_size", 4), ("log_every", 1), ("warmup_steps", 0),
                     ("checkpoint_every", 2))}

STUDENT = {"distill.from": "teacher", "distill.student": "hybrid:every=2",
           "distill.eval_batches": 1, **FAST}

def sweep():
  return ENTRIES
'''


def _write(tmp_path, entries: str) -> str:
  exp = tmp_path / "exp.py"
  exp.write_text(EXPERIMENT + f"\nENTRIES = {entries}\n")
  return str(exp)


def test_distill_entry_needs_an_earlier_teacher(tmp_path):
  # Listed before its teacher: an error naming the earlier entries, before anything runs.
  exp = _write(tmp_path, '[("student", STUDENT), ("teacher", {})]')
  with pytest.raises(UserError, match="must name an earlier entry"):
    sweep.plan(exp, None, str(tmp_path / "runs"))
  exp = _write(tmp_path, '[("teacher", {}), ("student", {**STUDENT, "model.d_model": 32})]')
  with pytest.raises(UserError, match=r"only distill\.\* keys"):
    sweep.plan(exp, None, str(tmp_path / "runs"))
  assert not (tmp_path / "runs").exists()


def test_distill_data_overrides_checked_at_plan_and_applied_to_the_teachers_data(
    tmp_path, monkeypatch):
  # The data is the teacher run's, unknown until it trained: distill.data.* keys used to fail
  # every plan ("unknown config key"), since they were applied to a config whose data was None.
  for bad, match in (('"distill.data.seq_length": 8', r"distill\.data\.seq_length.*seq_len"),
                     ('"distill.data.seq_len": "eight"', r"distill\.data\.seq_len.*wrong type")):
    exp = _write(tmp_path, f'[("teacher", {{}}), ("student", {{**STUDENT, {bad}}})]')
    with pytest.raises(UserError, match=match):
      sweep.plan(exp, None, str(tmp_path / "runs"))
  # Values are checked on the teacher entry's data config, before the teacher trains.
  exp = _write(tmp_path, '[("teacher", {}), ("student", {**STUDENT, "distill.data.seq_len": 4})]')
  with pytest.raises(UserError, match="data.seq_len = 4"):
    sweep.plan(exp, None, str(tmp_path / "runs"))
  exp = _write(tmp_path,
               '[("teacher", {}), ("student", {**STUDENT, "distill.data.seq_len": 10**6})]')
  with pytest.raises(UserError, match="sequence longer than the data"):
    sweep.plan(exp, None, str(tmp_path / "runs"))
  exp = _write(tmp_path, '[("teacher", {}), ("student", {**STUDENT, "distill.data.seq_len": 8})]')
  _, specs = sweep.plan(exp, None, str(tmp_path / "runs"))
  (tmp_path / "plain").mkdir()
  _, plain = sweep.plan(_write(tmp_path / "plain", '[("teacher", {}), ("student", STUDENT)]'),
                        None, str(tmp_path / "runs"))
  assert specs[1][1] != plain[1][1]  # the override is part of the entry's identity

  # Applied on top of the teacher run's data config (here: seq_len 16 → 8, source kept).
  from memx.config import to_dict
  from memx.distill import runner as runner_mod
  from memx.distill import sweep_entry
  from memx.experiment import loading
  module = loading.load_module(exp)
  teacher_dir = tmp_path / "runs" / "exp" / "teacher"
  teacher_dir.mkdir(parents=True)
  (teacher_dir / "config.json").write_text(json.dumps(to_dict(module.config())))
  seen = {}

  def capture(teacher, dcfg, out, **kw):
    seen["data"] = dcfg.data
    raise RuntimeError("stop before training")
  monkeypatch.setattr(runner_mod, "distill", capture)
  with pytest.raises(RuntimeError, match="stop before training"):
    sweep_entry.run(specs[1][0], module, resume=False, overwrite=False, progress=False)
  assert seen["data"].seq_len == 8 and seen["data"].source == "corpus"


@pytest.mark.slow
def test_sweep_trains_teacher_then_distils(tmp_path):
  exp = _write(tmp_path, '[("teacher", {}), ("student", STUDENT)]')
  sweep_dir = sweep.run_sweep(exp, workdir=str(tmp_path / "runs"), progress=False)
  index = RunIndex(sweep_dir / "index.sqlite")
  assert {r["name"]: r["status"] for r in index.rows()} == {"teacher": "done", "student": "done"}
  index.close()
  summary = json.loads((sweep_dir / "student" / "summary.json").read_text())
  assert summary["teacher"] == "teacher" and summary["stages"] == [1, 2, 3]
  # The report row compares like with like: no train loss (the stages' objective is KL / layer
  # MSE, kept as final_objective), and the eval numbers come from the teacher run's eval rows,
  # where the teacher's own loss reproduces its run's final_eval_loss.
  assert summary["final_train_loss"] is None and summary["final_objective"] > 0
  teacher = json.loads((sweep_dir / "teacher" / "summary.json").read_text())
  assert summary["teacher_loss"] == pytest.approx(teacher["final_eval_loss"], rel=1e-4)
  assert summary["final_eval_loss"] != pytest.approx(summary["teacher_loss"], rel=1e-6)
  records = [json.loads(line) for line in
             (sweep_dir / "student" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert train and all("loss" not in r and "objective" in r for r in train)
  assert all("loss" in r for r in records if r["split"] == "eval")
  cfg = json.loads((sweep_dir / "student" / "config.json").read_text())
  assert cfg["model"]["mixers"] == ["attention", "mamba2"]
  assert (sweep_dir / "student" / "distill" / "stage3" / "checkpoints").is_dir()
  from memx.experiment import report
  assert "student" in report.summary_table(sweep_dir)
  # Changed settings whose run fails: the entry's old summary must not read as its result.
  from memx.distill import sweep_entry
  from memx.experiment import loading
  from memx.experiment.runner import RunSpec
  module = loading.load_module(exp)
  spec = RunSpec(exp, None, {**dict(loading.sweep_entries(module))["student"],
                             "distill.stage1.lr": 1e9}, str(sweep_dir), "student")
  import memx.distill.runner as runner_mod
  real = runner_mod.distill

  def crash(*a, **k):
    raise RuntimeError("killed")
  runner_mod.distill = crash
  try:
    with pytest.raises(RuntimeError):
      sweep_entry.run(spec, module, resume=False, overwrite=True, progress=False)
  finally:
    runner_mod.distill = real
  assert not (sweep_dir / "student" / "summary.json").exists()
