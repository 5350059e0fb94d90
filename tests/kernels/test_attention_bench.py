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


def test_sweep_candidates_change_only_what_their_names_say(load_script, monkeypatch):
  """Each --sweep candidate is the problem's default tiles plus its own change (sessions 7 and
  9 built them on BlockSizes(), whose forward tile is not bf16's default)."""
  import dataclasses

  from memx.kernels.attention import CAUSAL, BlockSizes

  bench = load_script("scripts/bench_attention.py")
  monkeypatch.setattr(bench, "_memx", lambda impl, block_sizes, **kw: lambda p: block_sizes)
  problem = bench.Problem(bench.Shape(1, 1024, 16, 128, "bfloat16"), "causal", CAUSAL, None)
  default = BlockSizes.get_default("pallas_gpu", itemsize=2, head_dim=128)
  assert default != BlockSizes()  # the case the old candidates got wrong
  for tag, changes in bench.SWEEP.items():
    blocks = bench._memx_tiles(changes)(problem)
    assert blocks == dataclasses.replace(default, **changes), tag
  assert bench._memx_tiles(bench.SWEEP["default"])(problem) == default
