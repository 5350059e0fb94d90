"""End-to-end tests of the `memx` command: run, resume, report, and one-paragraph user errors.

Most calls go through memx.cli.main in-process (the runs are a few seconds each); a few go
through `python -m memx` to check what a user really sees on stderr.
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from memx.cli import main
from memx.config import config_hash, to_dict
from memx.data import make_loader
from memx.experiment import loading
from memx.experiment.runner import RunSpec, run
from memx.train.loop import split_seeds
from memx.train.metrics import read_metrics

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_sweep.py"
EXP = f"{FIXTURE}:base"
RUN_NAME = "tiny_sweep-base"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _cli(capsys, *argv) -> tuple[int, str, str]:
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _config(overrides: dict | None = None):
  return loading.build_config(loading.load_module(FIXTURE), "base", overrides)


def _train_steps(run_dir: pathlib.Path) -> list[int]:
  return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def _checkpoint_steps(run_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _assert_user_error(rc: int, err: str) -> None:
  assert rc == 2, err
  assert "Traceback" not in err
  assert err.startswith("memx: error: ")
  assert len(err.strip().splitlines()) == 1, err  # one paragraph, nothing else


# ---------------------------------------------------------------------------------------------
# A run, end to end


def test_run_writes_a_complete_run_directory_and_report_reads_it(tmp_path, capsys):
  rc, out, err = _cli(capsys, "run", EXP, "--workdir", tmp_path, "--set", "train.steps=3")
  assert rc == 0, err
  assert "Traceback" not in err
  run_dir = tmp_path / RUN_NAME
  assert f"run {RUN_NAME}: done after 3 steps" in out
  assert f"run directory: {run_dir}" in out

  cfg = _config({"train.steps": 3})
  assert json.loads((run_dir / "config.json").read_text()) == json.loads(
      json.dumps(to_dict(cfg)))

  prov = json.loads((run_dir / "provenance.json").read_text())
  assert prov["config_hash"] == config_hash(cfg)
  assert "sha" in prov["git"] and "dirty" in prov["git"]
  assert prov["packages"]["jax"] == jax.__version__
  assert all(prov["packages"][p] for p in ("jaxlib", "numpy", "optax", "orbax-checkpoint"))
  assert prov["devices"]["count"] == jax.device_count()
  assert prov["devices"]["platform"] == jax.devices()[0].platform
  seeds = split_seeds(0)
  assert prov["seeds"] == {"seed": 0, "data_seed": seeds.data_seed}
  loader = make_loader(cfg.data, batch_size=8, seed=seeds.data_seed, split="train")
  assert prov["data_hash"] == loader.data_hash
  assert re.fullmatch(r"[0-9a-f]{64}", prov["data_hash"])
  assert prov["mesh"] == {"data": jax.device_count()}

  records = read_metrics(run_dir / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [3] and math.isfinite(evals[0]["loss"])

  events = list((run_dir / "tb").iterdir())
  assert events and all(p.name.startswith("events.out.tfevents") for p in events)
  assert sum(p.stat().st_size for p in events) > 0

  assert _checkpoint_steps(run_dir) == ["2", "3"]  # every 2 steps and at the end, keep 2

  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "done" and summary["steps"] == 3
  assert summary["name"] == RUN_NAME
  assert math.isfinite(summary["final_eval_loss"]) and math.isfinite(summary["final_train_loss"])

  rc, out, err = _cli(capsys, "report", tmp_path)
  assert rc == 0, err
  lines = out.splitlines()
  assert lines[0].split()[:3] == ["run", "status", "eval"]
  row = next(line for line in lines if line.startswith(RUN_NAME))
  assert row.split()[1] == "done" and f"{summary['final_eval_loss']:.4f}" in row
  assert f"report: {tmp_path / 'report.md'}" in out
  assert RUN_NAME in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one paragraph on stderr, no traceback, nothing written


def _text_file(tmp: pathlib.Path) -> pathlib.Path:
  path = tmp / "tiny.txt"
  path.write_text("Only a few bytes of text.\n")
  return path


def _corrupt_npy(tmp: pathlib.Path) -> pathlib.Path:
  path = tmp / "tokens.npy"
  np.save(path, np.arange(1000, dtype=np.int32) % 200)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # a copy cut short
  return path


def _broken_experiment(tmp: pathlib.Path) -> pathlib.Path:
  path = tmp / "broken.py"
  path.write_text("def config(variant:\n")
  return path


def _not_a_directory(tmp: pathlib.Path) -> pathlib.Path:
  path = tmp / "afile"
  path.write_text("a regular file, not a directory")
  return path / "runs"


# name → (argv after "run", fragments the message must contain)
BAD_INPUTS = {
    "unknown experiment file": lambda t: (
        [f"{t / 'nope.py'}:base"], ["nope.py", "does not exist", "config(variant)"]),
    "experiment with a syntax error": lambda t: (
        [f"{_broken_experiment(t)}:base"], ["broken.py", "syntax error"]),
    "unknown variant": lambda t: (
        [f"{FIXTURE}:huge"], ["unknown variant 'huge'", "valid variants: base, other"]),
    "unknown override key": lambda t: (
        [EXP, "--set", "model.d_modle=32"], ["'model.d_modle'", "did you mean model.d_model"]),
    "mistyped override value": lambda t: (
        [EXP, "--set", "train.steps=three"], ["train.steps = 'three'", "expected int"]),
    "override without a value": lambda t: (
        [EXP, "--set", "train.steps"], ["'train.steps'", "key=value"]),
    "heads not dividing width": lambda t: (
        [EXP, "--set", "model.n_heads=3"], ["model.n_heads = 3", "model.d_model = 16"]),
    "batch not divisible by the devices": lambda t: (
        [EXP, "--set", "train.batch_size=3"], ["train.batch_size = 3", "data-parallel size"]),
    "vocabulary smaller than the tokenizer's": lambda t: (
        [EXP, "--set", "model.vocab_size=100"], ["model.vocab_size = 100", "261 tokens"]),
    "sequence longer than the data": lambda t: (
        [EXP, "--set", f"data.paths={_text_file(t)}", "--set", "data.source=text",
         "--set", "data.seq_len=64"],
        ["data.seq_len = 64", "longer than the data", "1 text file(s)"]),
    "missing data file": lambda t: (
        [EXP, "--set", f"data.paths={t / 'missing.txt'}", "--set", "data.source=text"],
        ["missing.txt", "does not exist"]),
    "corrupt npy file": lambda t: (
        [EXP, "--set", f"data.paths={_corrupt_npy(t)}", "--set", "data.source=npy"],
        ["tokens.npy", "not a valid .npy file"]),
    "unwritable workdir": lambda t: (
        [EXP, "--workdir", _not_a_directory(t)], ["cannot write to run directory", "--workdir"]),
}


# Checked by the training loop's prepare(), which runs before the run directory is written.
CHECKED_AFTER_THE_RUN_DIRECTORY = ("batch not divisible by the devices",
                                   "vocabulary smaller than the tokenizer's")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_paragraph_with_exit_code_2(case, tmp_path, capsys):
  args, fragments = BAD_INPUTS[case](tmp_path)
  workdir = tmp_path / "runs"
  if "--workdir" not in args:
    args += ["--workdir", workdir]
  rc, out, err = _cli(capsys, "run", *args)
  _assert_user_error(rc, err)
  for fragment in fragments:
    assert fragment in err
  assert not workdir.exists()  # rejected before anything was written


@pytest.mark.parametrize("case", ["unknown experiment file", "corrupt npy file"])
def test_bad_input_from_the_real_command_has_no_traceback(case, tmp_path):
  args, fragments = BAD_INPUTS[case](tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "memx", "run", *map(str, args), "--workdir", str(tmp_path / "runs")],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  _assert_user_error(proc.returncode, proc.stderr)
  for fragment in fragments:
    assert fragment in proc.stderr
  assert proc.stdout == ""
  assert not (tmp_path / "runs").exists()


def _sweep_with_a_bad_entry(tmp: pathlib.Path) -> pathlib.Path:
  path = tmp / "exp.py"
  path.write_text("from memx.config import Config\n\n\ndef config(variant='base'):\n"
                  "  return Config()\n\n\ndef sweep():\n"
                  "  return [('ok', {}), ('bad', {'model.n_heads': 3})]\n")
  return path


@pytest.mark.parametrize(("args", "fragments"), [
    (lambda t: [_sweep_with_a_bad_entry(t)], ["sweep entry 'bad'", "model.n_heads = 3"]),
    (lambda t: [FIXTURE, "--slurm", "partition"], ["--slurm 'partition'", "key=value"]),
    (lambda t: [FIXTURE, "--workers", "0"], ["--workers 0"]),
    (lambda t: [t / "nope.py"], ["nope.py", "does not exist"]),
])
def test_bad_sweep_input_is_one_paragraph_with_exit_code_2(args, fragments, tmp_path, capsys):
  rc, out, err = _cli(capsys, "sweep", *args(tmp_path), "--workdir", tmp_path / "runs")
  _assert_user_error(rc, err)
  for fragment in fragments:
    assert fragment in err
  assert not (tmp_path / "runs").exists()


def test_report_of_a_missing_directory_is_a_user_error(tmp_path, capsys):
  rc, _, err = _cli(capsys, "report", tmp_path / "nowhere")
  _assert_user_error(rc, err)
  assert "does not exist" in err


# ---------------------------------------------------------------------------------------------
# Existing run directories, resume, and failed runs


def test_existing_run_is_refused_and_resume_continues_from_the_checkpoint(tmp_path, capsys):
  spec = RunSpec(str(FIXTURE), "base", {}, str(tmp_path), RUN_NAME)
  stopped = run(spec, stop_at_step=2, progress=False)  # as if interrupted after step 2
  assert (stopped["status"], stopped["steps"]) == ("stopped", 2)
  run_dir = tmp_path / RUN_NAME
  before = (run_dir / "metrics.jsonl").read_text()
  ckpt2 = (run_dir / "checkpoints" / "2").stat().st_mtime_ns

  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path)
  _assert_user_error(rc, err)
  assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
  assert (run_dir / "metrics.jsonl").read_text() == before  # the refusal touched nothing

  rc, out, err = _cli(capsys, "run", EXP, "--workdir", tmp_path, "--resume")
  assert rc == 0, err
  assert f"run {RUN_NAME}: done after 4 steps" in out
  # Steps 1-2 are the interrupted attempt's records, kept as they were; 3-4 were appended.
  assert (run_dir / "metrics.jsonl").read_text().startswith(before)
  assert _train_steps(run_dir) == [1, 2, 3, 4]
  assert _checkpoint_steps(run_dir) == ["2", "4"]
  assert (run_dir / "checkpoints" / "2").stat().st_mtime_ns == ckpt2
  summary = json.loads((run_dir / "summary.json").read_text())
  assert (summary["status"], summary["steps"]) == ("done", 4)
  assert math.isfinite(summary["final_eval_loss"])
  # (That the resumed run equals an uninterrupted one bit for bit is tests/train's job.)


def test_a_nan_failure_keeps_the_last_good_checkpoint_for_resume(tmp_path, capsys):
  base = ["run", EXP, "--workdir", tmp_path]
  rc, _, err = _cli(capsys, *base, "--set", "train.steps=2")
  assert rc == 0, err
  run_dir = tmp_path / RUN_NAME

  # Continue with an absurd learning rate: the loss turns NaN before the next checkpoint.
  rc, _, err = _cli(capsys, *base, "--resume", "--set", "train.steps=6", "--set", "optim.lr=1e9")
  assert rc == 1 and "non-finite" in err and "at step 4" in err and "Traceback" not in err
  # Only complete checkpoints: no step written after the NaN, no temporary directories.
  assert _checkpoint_steps(run_dir) == ["2"]
  assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())
  losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
  assert not math.isfinite(losses[-1])

  # A sane learning rate resumes from step 2 and finishes; the NaN records are dropped.
  rc, out, err = _cli(capsys, *base, "--resume", "--set", "train.steps=6")
  assert rc == 0, err
  assert f"run {RUN_NAME}: done after 6 steps" in out
  assert _train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
  records = read_metrics(run_dir / "metrics.jsonl")
  assert all(math.isfinite(r["loss"]) for r in records)
  assert _checkpoint_steps(run_dir) == ["4", "6"]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert (summary["status"], summary["steps"]) == ("done", 6)
  assert math.isfinite(summary["final_eval_loss"])
  assert json.loads((run_dir / "config.json").read_text())["optim"]["lr"] == 3e-3


# ---------------------------------------------------------------------------------------------
# Regressions of bugs found in review


def test_a_nan_failure_never_checkpoints_the_diverged_state(tmp_path, capsys):
  base = ["run", EXP, "--workdir", tmp_path, "--set", "checkpoint.every=1",
          "--set", "optim.warmup_steps=0"]
  rc, _, err = _cli(capsys, *base, "--set", "optim.lr=1e9")
  assert rc == 1 and "non-finite" in err
  # The error says the last good checkpoint is intact and to lower optim.lr: do so.
  rc, _, err = _cli(capsys, *base, "--resume")
  assert rc == 0, err


@pytest.mark.parametrize("case", CHECKED_AFTER_THE_RUN_DIRECTORY)
def test_a_rejected_config_leaves_nothing_that_blocks_the_corrected_run(case, tmp_path, capsys):
  args, _ = BAD_INPUTS[case](tmp_path)
  rc, _, err = _cli(capsys, "run", *args, "--workdir", tmp_path)
  _assert_user_error(rc, err)
  assert not (tmp_path / RUN_NAME).exists()
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path)  # fixed: no bad override
  assert rc == 0, err


def test_resuming_a_finished_run_keeps_its_summary(tmp_path, capsys):
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path)
  assert rc == 0, err
  first = json.loads((tmp_path / RUN_NAME / "summary.json").read_text())
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path, "--resume")
  assert rc == 0, err
  again = json.loads((tmp_path / RUN_NAME / "summary.json").read_text())
  for key in ("final_train_loss", "final_eval_loss", "tokens_per_s"):
    assert again[key] == first[key], key


def test_a_refused_or_finished_resume_leaves_config_and_provenance_as_trained(tmp_path, capsys):
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path)
  assert rc == 0, err
  run_dir = tmp_path / RUN_NAME
  files = {f: (run_dir / f).read_bytes() for f in ("config.json", "provenance.json")}
  # Refused: another model (the checkpoint's fingerprint), or fewer steps than checkpointed.
  for override in ("model.d_model=32", "train.steps=2"):
    rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path, "--resume", "--set", override)
    _assert_user_error(rc, err)
  # Finished already with another lr: refused (its summary is not that config's result), and
  # the lr that never trained is not recorded.
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path, "--resume", "--set", "optim.lr=0.5")
  _assert_user_error(rc, err)
  assert "finished earlier with another config (optim.lr = " in err and "--overwrite" in err
  assert {f: (run_dir / f).read_bytes() for f in files} == files


@pytest.mark.parametrize("name", ["..", ".", "/tmp", "a/b", ".hidden"])
def test_a_run_name_outside_the_workdir_is_refused_before_anything_is_deleted(name, tmp_path,
                                                                             capsys):
  work = tmp_path / "work"
  (work / "other").mkdir(parents=True)
  (tmp_path / "sentinel").write_text("keep")
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", work, "--name", name, "--overwrite")
  _assert_user_error(rc, err)
  assert "plain directory name" in err
  assert (tmp_path / "sentinel").read_text() == "keep" and (work / "other").is_dir()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
  rc, _, err = _cli(capsys, "run", EXP, "--workdir", tmp_path, "--resume", "--overwrite")
  _assert_user_error(rc, err)
  assert "give one of them" in err and not (tmp_path / RUN_NAME).exists()
