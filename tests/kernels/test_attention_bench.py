"""scripts/bench_attention.py runs end to end on tiny CPU shapes and writes its reports."""

import json


def test_bench_quick_smoke(tmp_path, load_script):
  bench = load_script("scripts/bench_attention.py")
  bench.main(["--out", str(tmp_path), "--quick", "--seqs", "64", "--tokens", "128",
              "--masks", "causal,moa,packed", "--impls", "dispatch,xla", "--reps", "2"])
  results = json.loads((tmp_path / "results.json").read_text())
  records = results["records"]
  assert {r["mask"] for r in records} == {"causal", "moa", "packed"}
  assert all(r["status"] == "ok" for r in records), records
  assert {r["pass"] for r in records} == {"fwd", "fwd+bwd"}
  assert all(r["tflops"] > 0 and r["temp_bytes"] >= 0 for r in records)
  moa = next(r for r in records if r["mask"] == "moa")
  assert abs(moa["density_vs_causal"] - 0.25) < 0.03
  assert next(r for r in records if r["impl"] == "dispatch")["dispatched"] == "xla"
  table = (tmp_path / "results.md").read_text()
  assert "| 2x64 | causal |" in table and "packed" in table
