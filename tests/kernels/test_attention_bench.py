"""scripts/bench_attention.py runs end to end on tiny CPU shapes and writes its reports."""

import importlib.util
import json
import pathlib

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_attention.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_attention", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_quick_smoke(tmp_path):
  bench = _load_bench()
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
