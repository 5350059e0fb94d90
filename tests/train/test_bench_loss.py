"""scripts/bench_loss.py measures both loss forms at a small size; the blocked one is lighter."""

import importlib.util
import pathlib

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_loss.py"


def test_bench_loss_small():
  spec = importlib.util.spec_from_file_location("bench_loss", _SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  full, blocked = bench.bench(d=32, layers=1, vocabs=(4096,), batch=2, seq=64, block=512, reps=2)
  assert full["loss"] == "full logits" and blocked["loss"] == "vocab blocks of 512"
  assert full["step ms"] > 0 and blocked["step ms"] > 0
  # [2·64, 4096] float32 logits are 2 MiB, kept several times over; one block is 256 KiB.
  assert blocked["temp bytes"] < 0.6 * full["temp bytes"], (full, blocked)
