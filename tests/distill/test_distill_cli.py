"""`memx distill` end to end on a tiny teacher, and its one-paragraph errors (exit 2)."""

import json

import jax
import numpy as np

from memx.cli import main
from memx.distill.cli import parse_student
from memx.models.decode import generate
from memx.train.restore import load_trained

FAST = ["--set", "eval_batches=1"] + [
    x for i in (1, 2, 3) for x in ("--set", f"stage{i}.steps=4", "--set", f"stage{i}.batch_size=4",
                                   "--set", f"stage{i}.log_every=1")]


def test_cli_distills_end_to_end(teacher_run, tmp_path, capsys):
  out = tmp_path / "d"
  rc = main(["distill", str(teacher_run), "--student", "hybrid:every=2", "--stages", "1,2,3",
             "--out", str(out), *FAST])
  assert rc == 0, capsys.readouterr().err
  text = capsys.readouterr().out
  assert "layers [1] become Mamba-2" in text and str(out / "stage3") in text
  record = json.loads((out / "distill.json").read_text())
  assert record["converted_layers"] == [1] and record["config"]["student"]["every"] == 2
  student = load_trained(out / "stage3")
  assert student.cfg.model.mixers == ("attention", "mamba2")
  # The student generates like any memx model (recurrent state for its Mamba-2 layer).
  tokens = generate(student.model, jax.numpy.zeros((1, 4), jax.numpy.int32), 3)
  assert tokens.shape == (1, 7)
  # Again without --resume: refused; with --resume: every stage kept, nothing rerun.
  assert main(["distill", str(teacher_run), "--student", "hybrid:every=2", "--out", str(out),
               *FAST]) == 2
  assert "--resume" in capsys.readouterr().err
  rc = main(["distill", str(teacher_run), "--student", "hybrid:every=2", "--out", str(out),
             "--resume", *FAST])
  assert rc == 0 and capsys.readouterr().out.count("finished earlier") == 3
  # A finished stage whose step count changed is not kept as if it had been trained so.
  rc = main(["distill", str(teacher_run), "--student", "hybrid:every=2", "--out", str(out),
             "--resume", *FAST, "--set", "stage1.steps=3"])
  err = capsys.readouterr().err
  assert rc == 2 and "stage1.steps is now 3" in err and "--overwrite" in err


def test_cli_errors_before_any_work(teacher_run, tmp_path, capsys):
  out = tmp_path / "e"
  cases = [
      (["--student", "ring"], "--student 'ring'"),
      (["--student", "hybrid:every=x"], "every=N"),
      (["--student", "hybrid:every=1"], "student.every"),
      (["--stages", "3,1"], "distill.stages"),
      (["--stages", "3"], "stage 3 starts from stage 2"),
      (["--set", "stage2.lr=-1"], "stage2.lr"),
      (["--set", "student.gate_scale=oops"], "student.gate_scale"),
  ]
  for args, message in cases:
    assert main(["distill", str(teacher_run), "--out", str(out), *args]) == 2, args
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, (args, err)
  assert main(["distill", str(tmp_path), "--out", str(out)]) == 2
  assert "not a memx run" in capsys.readouterr().err
  assert not out.exists()
  (tmp_path / "afile").write_text("")
  assert main(["distill", str(teacher_run), "--out", str(tmp_path / "afile")]) == 2
  err = capsys.readouterr().err
  assert "is a file" in err and "Traceback" not in err


def test_parse_student():
  assert parse_student("linear") == {"student.kind": "linear"}
  assert parse_student("hybrid:every=4") == {"student.kind": "hybrid", "student.every": 4}
  np.testing.assert_equal(parse_student("hybrid"), {"student.kind": "hybrid"})
