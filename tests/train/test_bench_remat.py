"""scripts/bench_remat.py at a small size: layer recompute keeps less than plain autodiff, and
remat="dots" costs fewer FLOPs than the matmul-only policy it replaced, and "offload" is
"dots" on CPU."""


import jax


def test_bench_remat_small(load_script):
  bench = load_script("scripts/bench_remat.py")
  checkpoint = jax.checkpoint
  rows = bench.bench(d=64, layers=1, vocab=256, batch=1, seq=512, mixers=("mamba2",))
  assert jax.checkpoint is checkpoint  # the baseline's patch is undone
  got = {r["variant"]: r for r in rows}
  assert list(got) == ["none", "none, plain", "dots", "dots, matmuls", "offload"]
  assert got["none"]["saved vs baseline"] < 0.6, got["none"]
  assert got["dots"]["gflops"] < got["dots, matmuls"]["gflops"], rows
  assert got["dots"]["flops vs remat none"] <= 1.01, rows
  # XLA:CPU drops the host moves: remat="offload" compiles to "dots" there.
  assert got["offload"]["step_bytes"] == got["dots"]["step_bytes"], rows
  assert got["offload"]["host_temp_bytes"] == 0
