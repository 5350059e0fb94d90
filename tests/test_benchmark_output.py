"""memx.benchmark.write_results: both files, whole, with the rows and the run's context."""

import json

from memx.benchmark import write_results


def test_write_results_json_and_markdown(tmp_path):
  rows = [{"name": "a", "ms": 1.23456, "bytes": 10}, {"name": "b", "ms": 2.0, "bytes": 20}]
  md = write_results(tmp_path / "out", "Demo", {"d": 8}, rows)
  got = json.loads((tmp_path / "out" / "results.json").read_text())
  assert got["rows"] == rows and got["settings"] == {"d": 8} and got["jax"] and got["device"]
  assert (tmp_path / "out" / "results.md").read_text() == md
  assert md.splitlines()[0].startswith("# Demo (")
  assert md.splitlines()[2:] == ["| name | ms | bytes |", "|---|---|---|", "| a | 1.235 | 10 |",
                                 "| b | 2 | 20 |"]
  assert not list((tmp_path / "out").glob("*.tmp"))
