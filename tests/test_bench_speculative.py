"""scripts/bench_speculative.py: the round-cost model (expected tokens, break-even acceptance)
and the timed parts at the tiny size."""

import json

import pytest


def test_expected_tokens_and_break_even(load_script):
  bench = load_script("scripts/bench_speculative.py")
  # E(a, k) = sum_{i=0}^{k} a^i
  for a in (0.0, 0.3, 0.8, 1.0):
    for k in (1, 4):
      assert bench.expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))
  # A round costing 2.2 target steps at k = 2 breaks even where 1 + a + a^2 = 2.2.
  a = bench.break_even(2.2, 2)
  assert 1 + a + a * a == pytest.approx(2.2, abs=1e-9)
  assert bench.break_even(5.0, 2) is None       # even all 3 tokens do not pay for 5 steps
  assert bench.break_even(1.0, 3) == pytest.approx(0.0, abs=1e-9)


def test_tiny_run_writes_every_part(load_script, tmp_path):
  bench = load_script("scripts/bench_speculative.py")
  assert bench.main(["--out", str(tmp_path), "--size", "tiny", "--repeats", "1",
                     "--calls", "2"]) == 0
  rows = {r["part"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
  assert rows["target step"]["× target step"] == 1.0
  for k in bench.DRAFT_LENS:
    assert rows[f"verify {k}"]["ms"] > 0
    for name in ("attention", "mamba2"):
      r = rows[f"round: {name} draft, k={k}"]
      want = (k + 1) * rows[f"draft {name}"]["ms"] + rows[f"verify {k}"]["ms"]
      assert r["ms"] == pytest.approx(want)
      assert r["speedup a=0.9"] == pytest.approx(
          bench.expected_tokens(0.9, k) / r["× target step"])
