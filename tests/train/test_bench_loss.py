"""scripts/bench_loss.py measures both loss forms at a small size; the blocked one is lighter."""

def test_bench_loss_small(load_script):
  bench = load_script("scripts/bench_loss.py")
  full, blocked = bench.bench(d=32, layers=1, vocabs=(4096,), batch=2, seq=64, block=512, reps=2)
  assert full["loss"] == "full logits" and blocked["loss"] == "vocab blocks of 512"
  assert full["step ms"] > 0 and blocked["step ms"] > 0
  # [2·64, 4096] float32 logits are 2 MiB, kept several times over; one block is 256 KiB.
  assert blocked["temp bytes"] < 0.6 * full["temp bytes"], (full, blocked)
