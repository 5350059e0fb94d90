"""scripts/bench_ssm.py runs end to end on tiny CPU shapes and writes its reports."""

import json


def test_bench_tiny_smoke(tmp_path, load_script):
  bench = load_script("scripts/bench_ssm.py")
  bench.main(["--out", str(tmp_path), "--tiny", "--repeats", "2", "--forms", "xla,lax_scan"])
  results = json.loads((tmp_path / "results.json").read_text())
  rows = [r for r in results["records"] if r["form"] != "pallas_gpu"]
  passes = ("fwd", "fwd+bwd")
  assert {(r["kind"], r["form"], r["pass_"]) for r in rows} == {
      (k, f, p) for k in ("ssd", "scan") for f in ("xla", "lax_scan") for p in passes} | {
      ("conv", "xla", p) for p in passes}
  assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["temp_bytes"] >= 0 for r in rows)
  assert all(r["tflops"] > 0 for r in rows if r["kind"] == "ssd")
  table = (tmp_path / "results.md").read_text()
  assert "| ssd 1x64 H2 P16 N16 | xla | fwd |" in table and "scan 2x64x32" in table
  assert "| conv 1x64x32 W4 | xla | fwd+bwd |" in table
