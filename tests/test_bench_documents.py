"""scripts/bench_documents.py: paragraph documents, and masked/plain rows of one process."""

import numpy as np


def test_documents_and_rows(tmp_path, load_script):
  bench = load_script("scripts/bench_documents.py")
  path, stats = bench.write_documents(tmp_path / "docs.npy")
  tokens = np.load(path)
  assert tokens[-1] == bench.EOS and (tokens == bench.EOS).sum() == stats["documents"] > 1000
  assert stats["doc_tokens_median"] <= stats["doc_tokens_p90"]
  rows = bench.measure("hybrid", "tiny", path, repeats=1)
  assert [r["document_mask"] for r in rows] == [False, True]
  assert rows[0]["time_x_plain"] == rows[0]["temp_x_plain"] == 1.0
  assert rows[1]["docs_per_row"] > 1 and rows[1]["step_ms"] > 0 and rows[1]["temp_MiB"] > 0
