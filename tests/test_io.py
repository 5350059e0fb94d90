"""memx._io.atomic_file: the target is replaced whole or not at all."""

import json

import numpy as np
import pytest

from memx._io import atomic_file
from memx.sparse.plan import Plan, PlanError
from memx.sparse.rules import Rule


def test_atomic_file_replaces_on_success_and_cleans_up_on_failure(tmp_path):
  path = tmp_path / "sub" / "x.json"
  with atomic_file(path) as f:
    f.write("new")
  assert path.read_text() == "new"
  with pytest.raises(TypeError), atomic_file(path) as f:
    f.write("{")
    json.dump({"x": object()}, f)  # fails half-way through
  assert path.read_text() == "new"
  assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]  # no temporary left


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path):
  """0666 less the umask, as open() gives: a run's JSON files are readable by the group that
  shares a sweep (a temporary file alone would be 0600)."""
  import os
  plain = tmp_path / "plain"
  plain.write_text("x")
  for name, mode in (("a.json", "w"), ("b.png", "wb")):
    with atomic_file(tmp_path / name, mode) as f:
      f.write("x" if mode == "w" else b"x")
    assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
  old = os.umask(0o027)
  try:
    from memx import _io
    _io._umask.cache_clear()
    with atomic_file(tmp_path / "c.json") as f:
      f.write("x")
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o640
  finally:
    os.umask(old)
    _io._umask.cache_clear()


def test_plan_files_are_never_half_written(tmp_path):
  plan = Plan(kind="moa", fingerprint="f", n_layers=1, n_heads=2, lengths=(8,),
              layers=((Rule(2, 0.0, 1), Rule.full()),))
  path = plan.save(tmp_path / "p.json")
  bad = Plan(kind="moa", fingerprint="f", n_layers=1, n_heads=2, lengths=(8,),
             layers=plan.layers, meta={"x": np.float32(1.0)})   # not JSON-serializable
  with pytest.raises(TypeError):
    bad.save(path)
  assert Plan.load(path) == plan and [p.name for p in tmp_path.iterdir()] == ["p.json"]
  d = json.loads(path.read_text())
  d["layers"][0][0][2] = 1.5  # a fractional sink count is refused, not truncated
  path.write_text(json.dumps(d))
  with pytest.raises(PlanError, match="n_sink = 1.5 is not a whole number"):
    Plan.load(path)


def test_atomic_file_onto_a_directory_fails_first_and_leaves_nothing(tmp_path):
  # It used to write the whole file, fail at the rename and leave the temporary file behind.
  target = tmp_path / "out"
  target.mkdir()
  with pytest.raises(IsADirectoryError, match="is a directory"):
    with atomic_file(target) as f:
      f.write("x")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(target.iterdir())
