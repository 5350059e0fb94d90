"""scripts/bench_local.py at its tiny size: every variant compiles and runs, local learning keeps
fewer temporaries than backprop, and the no-barrier ablation's patch is undone."""

from memx.train import local


def test_bench_local_tiny(load_script):
  bench = load_script("scripts/bench_local.py")
  hand_over = local.hand_over
  names = ["backprop", "G4-d0", "G4-d1-MAN",
           "G4-d1-nobarrier"]
  rows = bench.measure("tiny", names, repeats=1)
  assert local.hand_over is hand_over
  got = {r["variant"]: r for r in rows}
  assert list(got) == names
  assert got["backprop"]["temp_x_backprop"] == 1.0
  assert got["G4-d0"]["temp_MiB"] < got["backprop"]["temp_MiB"], rows
  assert all(r["step_ms"] > 0 for r in rows)
