"""Benchmark quantized KV caches (`kv_quant`, KIVI): exact cache bytes at LLM shapes, and the
decode step's memory and speed at a size this machine runs.

Part 1 (exact, nothing allocated): KV-cache bytes of 7B/8B-shaped models at several context
lengths, bf16 against 8/4/2-bit codes with groups of 32 (codes, scales, zeros and the
full-precision residual all counted; `kv_cache_bytes`, checked against the abstract cache).
Part 2 (compiled): the --size model's decode step from a cache of N tokens: XLA's argument
bytes (weights + cache), temporaries (the XLA path dequantizes one layer at a time: its
full-precision keys and values are a temporary), and decode tokens/s (16 steps under one jit
after an N - 16 token prompt; the variants alternate, medians over --repeats).

  python scripts/bench_kv_quant.py --out benchmarks/out/kv_quant               # CPU
  python scripts/bench_kv_quant.py --out $OUT/kv_quant --size gpu              # bf16
"""

import argparse
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from memx.benchmark import write_results
from memx.kernels.kv_quant import KVQuant
from memx.models.config import ModelConfig
from memx.models.decode import cache_bytes, kv_cache_bytes
from memx.models.transformer import TransformerLM
from memx.sparse.evaluate import decode_timer
from memx.timing import interleaved_medians
from memx.train.memory import compiled_memory

VARIANTS = {"dense": None, "kv8": KVQuant(8, 32), "kv4": KVQuant(4, 32),
            "kv2": KVQuant(2, 32)}
# name → (n_layers, n_heads, n_kv_heads, head_dim): Llama-2-7B (MHA) and Llama-3-8B (GQA)
SHAPES = {"7b-mha": (32, 32, 32, 128), "8b-gqa": (32, 32, 8, 128)}
LENGTHS = (4096, 32768, 131072)
NEW_TOKENS = 16
# size → (d_model, n_layers, n_heads, n_kv_heads, vocab, N, batch, compute dtype)
SIZES = {"cpu": (512, 4, 8, 4, 8192, 2048, 4, "float32"),
         "gpu": (2048, 8, 16, 8, 32000, 16384, 8, "bfloat16"),
         "tiny": (64, 1, 2, 2, 264, 64, 1, "float32")}  # tiny: the script's test


def cache_table() -> list[dict]:
  rows = []
  for shape, (layers, heads, kv_heads, hd) in SHAPES.items():
    cfg = ModelConfig(vocab_size=256, d_model=heads * hd, n_layers=layers, n_heads=heads,
                      n_kv_heads=kv_heads, compute_dtype="bfloat16")
    for n in LENGTHS:
      dense = kv_cache_bytes(cfg, n)
      for name, spec in VARIANTS.items():
        b = kv_cache_bytes(cfg, n, kv_quant=spec)
        rows.append({"part": "bytes", "shape": shape, "N": n, "cache": name,
                     "GiB": b / 2**30, "bytes_per_token": b / n, "x_bf16": b / dense})
  # The count is the cache's: the abstract cache of one shape at one length.
  cfg = ModelConfig(vocab_size=256, d_model=1024, n_layers=2, n_heads=8, n_kv_heads=8,
                    compute_dtype="bfloat16")
  model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  for spec in VARIANTS.values():
    abstract = jax.eval_shape(lambda s=spec: model.init_cache(1, 4096, kv_quant=s))
    assert cache_bytes(abstract) - 4 == kv_cache_bytes(cfg, 4096, kv_quant=spec)  # - "pos"
  return rows


def decode_table(size: str, repeats: int) -> list[dict]:
  d, layers, heads, kv_heads, vocab, n, batch, dtype = SIZES[size]
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                    n_kv_heads=kv_heads, compute_dtype=dtype)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rows = {}
  for name, spec in VARIANTS.items():
    cache = jax.eval_shape(lambda s=spec: model.init_cache(batch, n, kv_quant=s))
    step = jax.jit(lambda st, c, t: nnx.merge(graphdef, st).decode_step(t, c), donate_argnums=1)
    mem = compiled_memory(step.lower(state, cache, jax.ShapeDtypeStruct((batch,), jnp.int32))
                          .compile())
    rows[name] = {"part": "decode", "size": size, "N": n, "batch": batch, "cache": name,
                  "kv_MiB": kv_cache_bytes(cfg, n, batch, kv_quant=spec) / 2**20,
                  "argument_MiB": mem["argument_bytes"] / 2**20,
                  "temp_MiB": mem["temp_bytes"] / 2**20}
  timers = [decode_timer(model, n, new_tokens=NEW_TOKENS, batch=batch, kv_quant=spec)
            for spec in VARIANTS.values()]
  seconds = interleaved_medians(timers, (), repeats)
  for row, sec in zip(rows.values(), seconds, strict=True):
    row["tokens_per_s"] = batch * NEW_TOKENS / sec
    row["argument_x_dense"] = row["argument_MiB"] / rows["dense"]["argument_MiB"]
    row["speed_x_dense"] = seconds[0] / sec
  return list(rows.values())


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out/kv_quant")
  p.add_argument("--size", default="cpu", choices=sorted(SIZES))
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  settings = {"commit": sha, "size": args.size, "shape": SIZES[args.size],
              "repeats": args.repeats}
  print(write_results(args.out, "bench_kv_quant (bytes)", settings, cache_table()))
  print(write_results(f"{args.out}/decode", "bench_kv_quant (decode)", settings,
                      decode_table(args.size, args.repeats)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
