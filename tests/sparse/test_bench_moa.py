"""scripts/bench_moa.py: every method's row at a small size, and the equal-KV decode rows."""

import json
import sys

from memx.models.decode import kv_cache_bytes


def test_equal_kv_batch_fills_dense_kv_memory(load_script):
  bench = load_script("scripts/bench_moa.py")
  cfg = dict(bench.SIZES["cpu"], s=256)
  rules = bench.moa_rules(cfg["h"], cfg["s"], 0.25, share=cfg["h"] // cfg["g"])
  budget = kv_cache_bytes(bench.decode_config(None, cfg), cfg["s"], 3)
  per_seq = kv_cache_bytes(bench.decode_config(rules, cfg), cfg["s"], 1)
  batch = bench.equal_kv_batch(rules, cfg, budget)
  assert batch * per_seq <= budget < (batch + 1) * per_seq
  assert batch > 3  # a quarter of the pairs: several times dense's batch
  assert bench.equal_kv_batch(None, cfg, 1) == 1


def test_bench_moa_small_run_with_equal_kv(load_script, tmp_path, monkeypatch, capsys):
  bench = load_script("scripts/bench_moa.py")
  monkeypatch.setattr(sys, "argv", ["bench_moa.py", "--out", str(tmp_path), "--size", "cpu",
                                    "--length", "128", "--repeats", "1", "--decode-tokens", "2",
                                    "--equal-kv"])
  bench.main()
  rows = json.loads((tmp_path / "bench_moa.json").read_text())["rows"]
  assert set(rows) == {"dense", "moa", "moa_kv", "uniform"}
  dense = rows["dense"]
  assert "equal_kv_decode_batch" not in dense
  for name in ("moa", "moa_kv", "uniform"):
    r = rows[name]
    assert r["equal_kv_kv_bytes"] <= dense["kv_bytes"] < r["equal_kv_kv_bytes"] + r["kv_bytes"]
    assert r["equal_kv_decode_batch"] > dense["decode_batch"]
    assert r["equal_kv_decode_tokens_per_s"] > 0
  table = (tmp_path / "bench_moa.md").read_text()
  assert "Decode at dense's KV memory" in table and "| moa_kv |" in table


def test_decode_after_a_chunked_prefill(load_script):
  """Large equal-KV batches prefill in chunks (ring caches: unrolled static chunks)."""
  from flax import nnx

  from memx.models.transformer import TransformerLM
  from memx.sparse.evaluate import decode_tokens_per_s

  bench = load_script("scripts/bench_moa.py")
  cfg = dict(bench.SIZES["cpu"], s=64, h=4, g=2, d=16, layers=1)
  rules = bench.moa_rules(cfg["h"], cfg["s"], 0.5)
  model = TransformerLM(bench.decode_config(rules, cfg), rngs=nnx.Rngs(0))
  assert decode_tokens_per_s(model, 64, new_tokens=2, batch=3, repeats=1, prefill_chunk=16) > 0
