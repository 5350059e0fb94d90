"""scripts/bench_lora.py: exact state bytes of full fine-tuning, LoRA and QLoRA; matmul and step
rows."""


def test_state_matmul_and_step_rows(load_script):
  bench = load_script("scripts/bench_lora.py")
  rows = {(r["param_dtype"], r["variant"]): r for r in bench.state_bytes(
      ["125m"], ["full", "lora_r16", "qlora_r16"])}
  full, lora, qlora = (rows[("float32", v)] for v in ("full", "lora_r16", "qlora_r16"))
  # 125m: d 768, 12 MHA heads of 64, SwiGLU 2048, tied 32000-row embedding. Rank-16 adapters:
  # per layer 4 x 16 (768 + 768) on attention, 2 x 16 (768 + 2048) + 16 (2048 + 768) on SwiGLU.
  adapters = 12 * (4 * 16 * 1536 + 3 * 16 * 2816)
  assert lora["trainable_M"] == qlora["trainable_M"] == adapters / 1e6
  assert abs(lora["opt_state_MiB"] * 2**20 - 8 * adapters) < 64  # AdamW: 2 float32 moments
  targets = 12 * (4 * 768 * 768 + 3 * 768 * 2048)
  assert abs((lora["model_MiB"] - full["model_MiB"]) * 2**20 - 4 * adapters) < 1
  # QLoRA's bases: ~4.127 bits per weight (codes, int8 block scales, their float32 scales)
  saved = (lora["model_MiB"] - qlora["model_MiB"]) * 2**20
  bits = (4 * targets - saved) * 8 / targets
  assert 4.12 < bits < 4.135, bits
  assert rows[("bfloat16", "qlora_r16")]["total_x_full"] < 0.2
  # under 8-way FSDP one device holds about an eighth of everything, the NF4 codes included
  for r in (full, lora, qlora):
    assert r["fsdp8_MiB_per_device"] < r["total_MiB"] / 7, r
  mm = {r["impl"]: r for r in bench.matmul_rows("tiny", 1)}
  assert mm["nf4_xla"]["weight_MiB"] < mm["dense"]["weight_MiB"] / 6
  assert mm["int4g128_xla"]["weight_MiB"] < mm["dense"]["weight_MiB"] / 6
  steps = bench.step_memory("tiny", 1, ["full", "qlora_r16"])
  assert steps[1]["argument_x_full"] < 0.5 and steps[0]["step_ms"] > 0
