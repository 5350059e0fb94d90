"""scripts/bench_optimizers.py: exact state bytes per optimizer, and compiled step rows."""


def test_state_and_step_rows(load_script):
  bench = load_script("scripts/bench_optimizers.py")
  rows = {r["optimizer"]: r for r in bench.state_bytes(["125m"])}
  assert rows["adamw"]["opt_x_adamw"] == 1.0
  # Two float32 moments per parameter (plus step counts); bf16 first moments: 6 bytes; Lion 4.
  assert 8.0 <= rows["adamw"]["opt_per_param_bytes"] < 8.001
  assert 6.0 <= rows["adamw_bf16mu"]["opt_per_param_bytes"] < 6.001
  assert 4.0 <= rows["lion"]["opt_per_param_bytes"] < 4.001
  assert rows["adafactor"]["opt_x_adamw"] < 0.01  # every large matrix factored
  # GaLore at rank 128: projected moments of the attention and MLP matrices (d 768), Adam on
  # the embedding table (32000 x 768, a quarter of the parameters) and the small leaves.
  assert 0.3 < rows["galore_r128"]["opt_x_adamw"] < 0.5
  # APOLLO at rank 256 keeps no projection but more rank; Mini (rank 1) only the embedding's
  # Adam moments and r x n rows.
  assert rows["galore_r128"]["opt_x_adamw"] < rows["apollo_r256"]["opt_x_adamw"] < 0.5
  assert rows["apollo_mini"]["opt_x_adamw"] < 0.25
  # Under 8-way FSDP one device holds an eighth of every optimizer's state, the low-rank and
  # factored statistics included (before, replicated, GaLore's per-device state at 125m was
  # 1.56x AdamW's, not 0.39x).
  for name, r in rows.items():
    if name not in ("sgd", "mezo_sgd"):  # their state is two step counters
      assert abs(r["fsdp8_opt_x_adamw"] / r["opt_x_adamw"] - 1) < 0.01, r
  for name in ("sgd", "mezo_sgd"):
    assert rows[name]["opt_per_param_bytes"] < 0.001
  # FP8 moments: 2 bytes of codes per parameter plus a float32 scale and exponent per group of
  # 128 (64 along the attention weights' head_dim) for each moment.
  assert 2.125 <= rows["adamw_fp8"]["opt_per_param_bytes"] < 2.25
  steps = {r["optimizer"]: r for r in bench.step_memory("tiny", 1, ["adamw", "adafactor",
                                                                    "mezo_sgd"])}
  assert steps["adafactor"]["argument_x_adamw"] < 1.0 and steps["adamw"]["step_ms"] > 0
  assert steps["mezo_sgd"]["argument_x_adamw"] < 0.4  # parameters alone
