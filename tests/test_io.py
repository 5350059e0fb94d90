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
