"""scripts/bench_parallel.py --quick runs and writes its JSON and markdown (slow: ~2-3 min)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]


@pytest.mark.slow
def test_bench_parallel_quick(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)  # the script sets its own device count
  res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_parallel.py"), "--out",
                        str(tmp_path), "--quick"], env=env, capture_output=True, text=True,
                       timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.loads((tmp_path / "bench_parallel.json").read_text())
  assert result["env"]["devices"] == 8
  rows = {r["row"]: r for r in result["strategies"]}
  one = rows["1 device"]["per_device_bytes"]
  for name in ("dp8", "fsdp8", "tp8", "sp8-ring", "sp8-a2a"):
    assert rows[name]["per_device_bytes"] < one, name
  longest = {r["row"]: r for r in result["longest"]}
  assert longest["1 device"]["max_seq_len"] > 0
  # The goal of the ring: >= 7x the sequence one device trains, under the same budget.
  assert longest["sp8-ring"]["vs_one_device"] >= 7, longest
  assert "Longest trainable sequence" in (tmp_path / "bench_parallel.md").read_text()
