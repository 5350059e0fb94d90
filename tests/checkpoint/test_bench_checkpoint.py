"""scripts/bench_checkpoint.py end to end at its tiny size: every mode in a fresh process."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_checkpoint_tiny(tmp_path):
  subprocess.run([sys.executable, "scripts/bench_checkpoint.py", "--size", "tiny", "--repeats",
                  "1", "--out", str(tmp_path)], cwd=REPO, check=True, timeout=600)
  result = json.loads((tmp_path / "bench_checkpoint.json").read_text())
  rows = {r["mode"]: r for r in result["rows"]}
  assert list(rows) == ["never", "sync", "async", "lazy", "lazy (zstd)"]
  assert rows["never"]["blocking_ms"] is None and rows["never"]["overhead"] == 0.0
  for mode in ("sync", "async", "lazy", "lazy (zstd)"):
    r = rows[mode]
    assert r["blocking_ms"] > 0 and 0 <= r["write_wait_ms"] <= r["blocking_ms"]
    assert r["checkpoint_bytes"] > 0 and r["step_ms"] > 0
  assert "| lazy (zstd) |" in (tmp_path / "bench_checkpoint.md").read_text()
