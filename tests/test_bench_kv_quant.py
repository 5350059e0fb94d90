"""scripts/bench_kv_quant.py: exact cache bytes at LLM shapes, and compiled decode rows."""

import pytest


# The tiny shapes run in microseconds: the k vs 2k timing may fall into noise (and says so).
@pytest.mark.filterwarnings("ignore:per_call_device_time")
def test_cache_bytes_and_decode_rows(load_script):
  bench = load_script("scripts/bench_kv_quant.py")
  rows = {(r["shape"], r["N"], r["cache"]): r for r in bench.cache_table()}
  # Llama-3-8B shape at 32k: 32 layers x 8 KV heads x 128 x 2 (k, v) x 2 bytes per token.
  assert rows[("8b-gqa", 32768, "dense")]["bytes_per_token"] == 32 * 8 * 128 * 2 * 2
  # 4-bit, per token and KV head: 2 x 64 bytes of codes, a bf16 scale and zero per channel per
  # 32 tokens for the keys (2 x 2 x 128 / 32 = 16 bytes) and per 32 channels for the values
  # (2 x 2 x 4 = 16): 160 of bf16's 512 bytes, plus the 32-token residual (1/4096 of 128k).
  kv4 = rows[("8b-gqa", 131072, "kv4")]["x_bf16"]
  assert abs(kv4 - (160 / 512 + 32 / 131072)) < 1e-12
  assert abs(rows[("7b-mha", 4096, "kv2")]["x_bf16"] - (96 / 512 + 32 / 4096)) < 1e-12
  # H2O at 32k: 512 or 128 slots per KV head, each with an int32 position and float32 score.
  h2o = rows[("8b-gqa", 32768, "h2o256+256")]["bytes_per_token"] * 32768
  assert h2o == 32 * 8 * 512 * (2 * 128 * 2 + 8)
  assert rows[("8b-gqa", 4096, "h2o64+64")]["x_bf16"] == 128 * (512 + 8) / (4096 * 512)
  decode = bench.decode_table("tiny", 1)
  assert [r["cache"] for r in decode] == ["dense", "kv8", "kv4", "kv2", "kv2r128", "h2o256+256",
                                          "h2o64+64"]
  assert decode[0]["kv_MiB"] > decode[1]["kv_MiB"] > decode[2]["kv_MiB"] > decode[3]["kv_MiB"]
  assert all(r["tokens_per_s"] > 0 for r in decode)
  attention = bench.kernel_table("tiny", 1)
  assert [r["cache"] for r in attention] == ["dense", "kv8 reference", "kv4 reference",
                                             "kv2 reference", "kv2r128 reference"]  # (+ pallas
  # on GPUs)
  assert attention[0]["cache_MiB"] > attention[1]["cache_MiB"] > attention[3]["cache_MiB"]
  assert all(r["us"] > 0 for r in attention)
  prefill = bench.prefill_table("tiny")
  assert [(r["cache"], r["chunk"]) for r in prefill] == [("dense", 48), ("dense", 6),
                                                         ("h2o256+256", 48), ("h2o256+256", 6)]
  assert prefill[1]["temp_MiB"] < prefill[0]["temp_MiB"]  # chunks: a fraction of the activations
