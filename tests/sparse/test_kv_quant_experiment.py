"""experiments/kv_quant/compare.py on a tiny trained run: one evaluation file per cache."""

import json


def test_compare_writes_an_evaluation_per_cache(tiny_run, load_script, capsys):
  compare = load_script("experiments/kv_quant/compare.py")
  assert compare.main([str(tiny_run), "--lengths", "128", "--batches", "1", "--batch-size", "2",
                       "--caches", "dense-ref,kv2g16"]) == 0
  out = capsys.readouterr().out
  assert "dense-ref" in out and "kv2g16" in out
  kv2 = json.loads((tiny_run / "evaluations" / "kv2g16.json").read_text())
  assert kv2["kv_quant"] == {"bits": 2, "group": 16, "residual": 0}
