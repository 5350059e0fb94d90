"""Sweeps: failure isolation, skipping finished runs, retries, changed entries, report, submitit.

Every run of a sweep is its own process. To keep these tests at a few seconds per run, the run
processes use one CPU device and share a persistent XLA compilation cache (both set through the
environment they inherit); the fixture's good entries differ only in the seed, so after the
first run they compile nothing.
"""

import json
import pathlib
import shutil

import pytest

from memx.config import config_hash
from memx.errors import UserError
from memx.experiment import loading
from memx.experiment.index import RunIndex
from memx.experiment.report import summary_table, write_report
from memx.experiment.sweep import run_sweep
from memx.train.metrics import read_metrics

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TINY_SWEEP = FIXTURES / "tiny_sweep.py"
NAMES = ["seed-0", "seed-1", "diverge"]


def _rows(sweep_dir: pathlib.Path) -> dict[str, dict]:
  index = RunIndex(sweep_dir / "index.sqlite")
  try:
    return {r["name"]: r for r in index.rows()}
  finally:
    index.close()


def _sweep(workdir: pathlib.Path, **kwargs) -> tuple[pathlib.Path, list[str]]:
  log: list[str] = []
  sweep_dir = run_sweep(str(kwargs.pop("experiment", TINY_SWEEP)), workdir=str(workdir),
                        progress=False, log=log.append, **kwargs)
  return sweep_dir, log


def _mtime(path: pathlib.Path) -> int:
  return path.stat().st_mtime_ns


def _hash(name: str) -> str:
  module = loading.load_module(TINY_SWEEP)
  return config_hash(loading.build_config(module, None, dict(loading.sweep_entries(module))[name]))


def _assert_done(sweep_dir: pathlib.Path, row: dict, name: str) -> dict:
  assert row["status"] == "done", row
  assert row["error"] is None
  summary = json.loads((sweep_dir / name / "summary.json").read_text())
  assert summary["status"] == "done" and summary["steps"] == 4
  assert row["summary"] == summary
  assert row["config_hash"] == _hash(name)
  return summary


def test_sweep_isolates_failures_skips_finished_runs_and_retries_the_rest(tmp_path, run_env):
  # 1. First sweep: the diverging run fails, the others finish regardless.
  sweep_dir, log = _sweep(tmp_path)
  assert sweep_dir == tmp_path / "tiny_sweep"
  rows = _rows(sweep_dir)
  assert list(rows) == NAMES  # sweep order
  for name in ("seed-0", "seed-1"):
    _assert_done(sweep_dir, rows[name], name)
  failed = rows["diverge"]
  assert failed["status"] == "failed" and failed["summary"] is None
  assert "NonFiniteLossError" in failed["error"] and "non-finite (nan) at step 2" in failed["error"]
  assert failed["ended"] >= failed["started"]
  assert not (sweep_dir / "diverge" / "summary.json").exists()
  assert log == ["[1/3] seed-0: running", "[1/3] seed-0: done",
                 "[2/3] seed-1: running", "[2/3] seed-1: done",
                 "[3/3] diverge: running", log[5]]
  assert log[5].startswith("[3/3] diverge: FAILED: NonFiniteLossError: loss became non-finite")
  assert (sweep_dir / "seed-0.log").is_file()  # progress=False: run output goes to a log

  # The report names every run and says why the failed one failed.
  report = write_report(sweep_dir).read_text()
  for name in NAMES:
    assert f"| {name} |" in report
  assert "1 failed" in report and "2 done" in report
  failures = report.split("### Failed runs", 1)[1].split("##", 1)[0]
  assert "**diverge** (failed)" in failures and "NonFiniteLossError" in failures
  table = summary_table(sweep_dir)
  assert [line.split()[:2] for line in table.splitlines()[2:]] == [
      ["seed-0", "done"], ["seed-1", "done"], ["diverge", "failed"]]

  # 2. Same sweep again: finished runs are skipped untouched, the failed one is retried.
  mtimes = {n: _mtime(sweep_dir / n / "summary.json") for n in ("seed-0", "seed-1")}
  sweep_dir, log = _sweep(tmp_path)
  assert log[:3] == ["[1/3] seed-0: finished earlier, skipped",
                     "[2/3] seed-1: finished earlier, skipped",
                     "[3/3] diverge: running"]
  assert log[3].startswith("[3/3] diverge: FAILED: NonFiniteLossError") and len(log) == 4
  rows = _rows(sweep_dir)
  assert rows["diverge"]["status"] == "failed"
  assert rows["diverge"]["started"] > failed["ended"]
  for name, mtime in mtimes.items():
    assert _mtime(sweep_dir / name / "summary.json") == mtime
    assert rows[name]["ended"] < rows["diverge"]["started"]

  # 3. Change two entries (seed-1's seed, diverge's learning rate), two workers: exactly those
  #    two run again, from scratch.
  run_env.setenv("MEMX_TEST_SWEEP_SEED", "7")
  run_env.setenv("MEMX_TEST_SWEEP_DIVERGE_LR", "3e-3")
  old_seed1 = rows["seed-1"]
  sweep_dir, log = _sweep(tmp_path, workers=2)
  assert log[0] == "[1/3] seed-0: finished earlier, skipped"
  assert set(log[1:]) == {
      f"[2/3] seed-1: queued (output in {sweep_dir}/seed-1.log)",
      f"[3/3] diverge: queued (output in {sweep_dir}/diverge.log)",
      "[2/3] seed-1: done", "[3/3] diverge: done"}
  rows = _rows(sweep_dir)
  assert _mtime(sweep_dir / "seed-0" / "summary.json") == mtimes["seed-0"]
  for name in NAMES:
    _assert_done(sweep_dir, rows[name], name)
  assert rows["seed-1"]["config_hash"] != old_seed1["config_hash"]
  assert rows["seed-1"]["summary"] != old_seed1["summary"]
  assert json.loads((sweep_dir / "seed-1" / "config.json").read_text())["train"]["seed"] == 7
  for name in ("seed-1", "diverge"):  # started over: one record per step, nothing appended
    steps = [r["step"] for r in read_metrics(sweep_dir / name / "metrics.jsonl")
             if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]

  # 4. A run the index still shows as "running" (its driver died) is retried: here one killed
  #    after its step-2 checkpoint, before it wrote step 4 and summary.json.
  index = RunIndex(sweep_dir / "index.sqlite")
  index.mark_running("seed-0", rows["seed-0"]["config_hash"])
  index.close()
  killed = sweep_dir / "seed-0"
  (killed / "summary.json").unlink()
  shutil.rmtree(killed / "checkpoints" / "4")
  metrics = killed / "metrics.jsonl"
  metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                             if json.loads(line)["step"] <= 3))
  sweep_dir, log = _sweep(tmp_path)
  assert log == ["[2/3] seed-1: finished earlier, skipped",
                 "[3/3] diverge: finished earlier, skipped",
                 "[1/3] seed-0: running", "[1/3] seed-0: done"]
  rows = _rows(sweep_dir)
  summary = _assert_done(sweep_dir, rows["seed-0"], "seed-0")
  assert summary["final_eval_loss"] is not None
  assert [r["step"] for r in read_metrics(metrics) if r["split"] == "train"] == [1, 2, 3, 4]
  assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["2", "4"]

  report = write_report(sweep_dir).read_text()
  assert "3 done, 0 failed" in report and "### Failed runs" not in report

  # 5. The driver died after queueing a changed entry (its row took the new hash, and lost its
  #    old summary) but before the worker cleared the old run: the next sweep starts it over,
  #    not "resumes" the old config's finished run.
  run_env.setenv("MEMX_TEST_SWEEP_SEED", "9")
  before = _rows(sweep_dir)["seed-1"]
  index = RunIndex(sweep_dir / "index.sqlite")
  index.mark_running("seed-1", _hash("seed-1"))
  index.close()
  assert _rows(sweep_dir)["seed-1"]["summary"] is None
  sweep_dir, log = _sweep(tmp_path)
  assert log[-2:] == ["[2/3] seed-1: running", "[2/3] seed-1: done"]
  row = _rows(sweep_dir)["seed-1"]
  assert row["summary"] != before["summary"]
  assert json.loads((sweep_dir / "seed-1" / "config.json").read_text())["train"]["seed"] == 9
  assert [r["step"] for r in read_metrics(sweep_dir / "seed-1" / "metrics.jsonl")
          if r["split"] == "train"] == [1, 2, 3, 4]


def test_submitit_local_executor_runs_the_sweep(tmp_path, run_env):
  sweep_dir, log = _sweep(tmp_path, experiment=FIXTURES / "tiny_pair.py",
                          executor="submitit-local")
  assert sweep_dir == tmp_path / "tiny_pair"
  assert [line.split(": ", 1)[1].split()[:2] for line in log[:2]] == [["submitted", "job"]] * 2
  assert sorted(log[2:]) == ["[1/2] pair-0: done", "[2/2] pair-1: done"]
  rows = _rows(sweep_dir)
  assert list(rows) == ["pair-0", "pair-1"]
  for name, row in rows.items():
    assert row["status"] == "done" and row["error"] is None
    summary = json.loads((sweep_dir / name / "summary.json").read_text())
    assert row["summary"] == summary and summary["steps"] == 4
  assert (sweep_dir / "submitit").is_dir()
  assert rows["pair-0"]["summary"]["final_train_loss"] != rows["pair-1"]["summary"][
      "final_train_loss"]


# ---------------------------------------------------------------------------------------------
# Validation before anything runs


def _experiment(tmp_path: pathlib.Path, sweep_body: str) -> pathlib.Path:
  path = tmp_path / "exp.py"
  path.write_text("from memx.config import Config\n\n\n"
                  "def config(variant='base'):\n  return Config()\n\n\n"
                  f"def sweep():\n  return {sweep_body}\n")
  return path


@pytest.mark.parametrize(("body", "fragments"), [
    ("[('ok', {}), ('typo', {'optim.learnig_rate': 1e-3})]",
     ["sweep entry 'typo'", "unknown config key 'optim.learnig_rate'"]),
    ("[('ok', {}), ('bad', {'model.n_heads': 3})]", ["sweep entry 'bad'", "model.n_heads = 3"]),
    ("[('ok', {}), ('wrong-type', {'train.steps': 'many'})]",
     ["sweep entry 'wrong-type'", "expected int"]),
    ("[('a', {}), ('a', {'train.seed': 1})]", ["names runs more than once: a"]),
    ("[('../escape', {})]", ["plain directory name", "../escape"]),
    ("[('..', {})]", ["plain directory name", "'..'"]),
    ("['a', 'b']", ["(run name, {dotted key: value}) pairs", "'a'"]),
    ("[('a', 'model.d_model=8')]", ["pairs", "model.d_model=8"]),
    ("[(3, {})]", ["plain directory name", "3"]),
    # Data the run could not use: found before the first entry trains, not in its worker.
    ("[('ok', {}), ('long', {'data.seq_len': 10**6})]",
     ["sweep entry 'long'", "sequence longer than the data"]),
    ("[('ok', {}), ('vocab', {'model.vocab_size': 100})]",
     ["sweep entry 'vocab'", "model.vocab_size = 100"]),
])
def test_a_bad_sweep_entry_is_rejected_before_anything_runs(tmp_path, body, fragments):
  exp = _experiment(tmp_path, body)
  with pytest.raises(UserError) as e:
    run_sweep(str(exp), workdir=str(tmp_path / "runs"), progress=False, log=print)
  for fragment in fragments:
    assert fragment in str(e.value)
  assert not (tmp_path / "runs").exists()


def test_an_experiment_without_sweep_is_rejected(tmp_path):
  exp = tmp_path / "exp.py"
  exp.write_text("from memx.config import Config\n\n\ndef config(variant='base'):\n"
                 "  return Config()\n")
  with pytest.raises(UserError, match=r"defines no sweep\(\) function"):
    run_sweep(str(exp), workdir=str(tmp_path / "runs"), progress=False, log=print)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"executor": "kubernetes"}, "unknown executor 'kubernetes'"),
    ({"workers": 0}, "--workers 0"),
    ({"slurm": {"slurm_partition": "gpu"}}, "local executor takes none"),
    ({"executor": "slurm", "slurm": {"slurm_partiton": "gpu"}}, "slurm_partiton"),
    ({"executor": "submitit-local", "slurm": {"timeout_min": "2h"}}, "were refused"),
    ({"executor": "submitit-local", "slurm": {"gpus_per_node": 8}}, "only timeout_min"),
])
def test_bad_sweep_options_are_user_errors(tmp_path, kwargs, fragment):
  with pytest.raises(UserError, match=fragment):
    run_sweep(str(TINY_SWEEP), workdir=str(tmp_path), progress=False, log=print, **kwargs)
  assert not any(tmp_path.iterdir())


def test_an_entry_removed_from_sweep_no_longer_fails_the_sweep(tmp_path, run_env, monkeypatch,
                                                               capsys):
  from memx.cli import main

  assert main(["sweep", str(TINY_SWEEP), "--workdir", str(tmp_path)]) == 1   # diverge fails
  assert "did not finish: diverge" in capsys.readouterr().err
  monkeypatch.setenv("MEMX_TEST_SWEEP_DROP_DIVERGE", "1")
  assert main(["sweep", str(TINY_SWEEP), "--workdir", str(tmp_path)]) == 0
  assert "did not finish" not in capsys.readouterr().err


def test_a_damaged_index_is_a_user_error(tmp_path):
  sweep_dir = tmp_path / "tiny_sweep"
  sweep_dir.mkdir()
  (sweep_dir / "index.sqlite").write_bytes(b"not a database" * 100)
  with pytest.raises(UserError, match="index.sqlite cannot be used"):
    run_sweep(str(TINY_SWEEP), workdir=str(tmp_path), progress=False, log=print)
  # A database whose `runs` table has another schema (it raised sqlite3.OperationalError).
  import sqlite3
  (sweep_dir / "index.sqlite").unlink()
  conn = sqlite3.connect(sweep_dir / "index.sqlite")
  conn.execute("CREATE TABLE runs (id INTEGER)")
  conn.commit()
  conn.close()
  with pytest.raises(UserError, match="index.sqlite cannot be used"):
    RunIndex(sweep_dir / "index.sqlite")


def test_a_file_that_is_not_python_is_a_user_error(tmp_path):
  # `memx run plan.json` used to end in an AttributeError traceback.
  plan = tmp_path / "plan.json"
  plan.write_text("{}")
  with pytest.raises(UserError, match="is not a Python file"):
    loading.load_module(plan)


def test_run_current_reuses_only_a_run_of_the_same_config(tmp_path):
  """The experiment pipelines' cache: a finished run is reused for its own config, and trained
  again from scratch for an edited one (never its stale summary)."""
  from memx.experiment.runner import RunSpec, run_current

  def spec(**overrides):
    return RunSpec(str(TINY_SWEEP), None, {"train.seed": 0, **overrides}, str(tmp_path), "r")

  def train_steps():
    return [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")
            if r["split"] == "train"]

  first = run_current(spec(), progress=False)
  steps = train_steps()
  summary = tmp_path / "r" / "summary.json"
  stamp = _mtime(summary)
  assert run_current(spec(), progress=False) == first and _mtime(summary) == stamp
  edited = run_current(spec(**{"optim.lr": 1e-2}), progress=False)
  assert edited["final_train_loss"] != first["final_train_loss"]
  assert json.loads((tmp_path / "r" / "config.json").read_text())["optim"]["lr"] == 1e-2
  assert train_steps() == steps  # from scratch, not appended to the old run


def test_rewritten_data_files_rerun_the_entry(tmp_path, run_env):
  """The config names data files by path: rewriting their bytes must not read as finished."""
  data = tmp_path / "data.txt"
  data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
  exp = tmp_path / "text_sweep.py"
  exp.write_text(TINY_SWEEP.read_text().replace("def config(", "def _base_config(", 1) + f"""

def config(variant="base"):
  import dataclasses
  cfg = _base_config(variant)
  return dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, source="text", paths=({str(data)!r},)))

def sweep():
  return [("text", {{}})]
""")
  sweep_dir, _ = _sweep(tmp_path / "runs", experiment=exp)
  assert _rows(sweep_dir)["text"]["status"] == "done"
  _, log = _sweep(tmp_path / "runs", experiment=exp)
  assert any("text: finished earlier, skipped" in line for line in log), log
  first = json.loads((sweep_dir / "text" / "provenance.json").read_text())["data_hash"]
  data.write_text("a different text, same path: another data set entirely. " * 60)
  _, log = _sweep(tmp_path / "runs", experiment=exp)
  assert not any("skipped" in line for line in log), log
  assert _rows(sweep_dir)["text"]["status"] == "done"
  again = json.loads((sweep_dir / "text" / "provenance.json").read_text())["data_hash"]
  assert again != first


def test_a_second_driver_on_the_same_sweep_is_refused(tmp_path, run_env):
  """Two drivers would train every queued run twice, in the same directories at once."""
  from memx.experiment import sweep as sweep_mod

  sweep_dir = tmp_path / "runs" / TINY_SWEEP.stem
  sweep_dir.mkdir(parents=True)
  held = sweep_mod._claim(sweep_dir)  # the first driver
  try:
    with pytest.raises(UserError, match=r"another `memx sweep` \(pid \d+\) is running"):
      _sweep(tmp_path / "runs")
  finally:
    held.close()
  assert not (sweep_dir / "seed-0").exists()  # nothing ran


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_its_runs_and_marks_them(tmp_path, run_env):
  """Killing the driver stopped nothing: its runs trained on, orphaned, and a rerun raced them
  in the same directories. Now they stop with it and their rows say they were interrupted."""
  import os
  import signal
  import subprocess
  import sys
  import time

  exp = tmp_path / "long_sweep.py"
  exp.write_text(TINY_SWEEP.read_text().replace("def config(", "def _base_config(", 1) + """

def config(variant="base"):
  import dataclasses
  cfg = _base_config(variant)
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=100000))

def sweep():
  return [("seed-0", {"train.seed": 0}), ("seed-1", {"train.seed": 1})]
""")
  workdir = tmp_path / "runs"
  driver = subprocess.Popen([sys.executable, "-m", "memx", "sweep", str(exp), "--workdir",
                             str(workdir), "--workers", "2"], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  sweep_dir = workdir / exp.stem
  deadline = time.monotonic() + 240
  while not all((sweep_dir / n / "metrics.jsonl").exists() for n in ("seed-0", "seed-1")):
    assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
    time.sleep(0.5)
  driver.send_signal(signal.SIGTERM)
  out = driver.communicate(timeout=240)[0]
  assert driver.returncode != 0, out
  children = [p for p in pathlib.Path("/proc").iterdir()
              if p.name.isdigit() and "memx.experiment.sweep" in _cmdline(p)
              and str(tmp_path) in (_cmdline(p) + _spec_of(p))]
  assert not children, [_cmdline(p) for p in children]
  rows = _rows(sweep_dir)
  assert {r["status"] for r in rows.values()} == {"failed"}, rows
  assert all(r["error"].startswith("interrupted") for r in rows.values())


def _spec_of(proc_dir: pathlib.Path) -> str:
  """The run spec a sweep worker process was given (its first argument: a JSON file)."""
  args = _cmdline(proc_dir).split()
  try:
    return pathlib.Path(args[args.index("memx.experiment.sweep") + 1]).read_text()
  except (ValueError, IndexError, OSError):
    return ""


def _cmdline(proc_dir: pathlib.Path) -> str:
  try:
    return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
  except OSError:
    return ""
