"""scripts/bench_microbatch.py: one row per microbatch count, ratios to the count of 1."""


def test_rows_per_count(load_script):
  bench = load_script("scripts/bench_microbatch.py")
  rows = bench.measure("tiny", [1, 2], repeats=1)
  assert [(r["microbatches"], r["rows_per_microbatch"]) for r in rows] == [(1, 16), (2, 8)]
  assert rows[0]["time_x_1"] == rows[0]["temp_x_1"] == 1.0
  assert all(r["step_ms"] > 0 and r["temp_MiB"] > 0 and r["param_MiB"] > 0 for r in rows)
  assert rows[1]["temp_x_1"] < 1.0  # half the rows' activations at a time


def test_distill_rows(load_script):
  bench = load_script("scripts/bench_microbatch.py")
  rows = bench.measure_distill("tiny", [1, 2], repeats=1)
  assert [r["microbatches"] for r in rows] == [1, 2]
  assert rows[1]["temp_x_1"] < 1.0 and rows[1]["step_ms"] > 0
