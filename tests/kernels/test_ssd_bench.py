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


def test_goals_never_use_a_baseline_from_elsewhere(load_script):
  """Without this run's associative_scan the scan goal says so (no anchor constant), the floor
  ratio names its time basis, and the fla goal says which grouping memx ran."""
  bench = load_script("scripts/bench_ssm.py")
  scan = bench.ScanShape(4, 4096, 1536).name
  big = bench.SsdShape(1, 16384).name

  def row(kind, shape, form, **kw):
    return dict(kind=kind, shape=shape, form=form, pass_="fwd", status="ok", **kw)

  goals = bench.goals([row("scan", scan, "pallas_gpu", time_ms=0.5, device_ms=0.3, vs_floor=1.2),
                       dict(row("scan", scan, "assoc_scan"), status="skipped"),
                       row("ssd", big, "pallas_gpu", time_ms=0.4, device_ms=0.35)])
  by_goal = {g["goal"].split(" (")[0]: g for g in goals}
  assert by_goal["linear_scan >= 5x faster than associative_scan"]["value"] is None
  assert "not measured in this run" in by_goal["linear_scan >= 5x faster than associative_scan"][
      "goal"]
  assert "device time" in by_goal["linear_scan within 3x of the memory floor"]["goal"]
  assert "g = 1" in by_goal["SSD fwd <= 1.0x fla chunk_simple_gla"]["goal"]
  goals = bench.goals([row("ssd", big, "pallas_gpu", time_ms=0.4, device_ms=0.35),
                       row("ssd", big, "pallas_gpu g=H", time_ms=0.5, device_ms=0.45),
                       row("ssd", big, "fla chunk_simple_gla", time_ms=0.3, device_ms=0.3)])
  (fla,) = goals
  assert "g = H, as fla" in fla["goal"] and fla["value"] == 0.45 / 0.3
