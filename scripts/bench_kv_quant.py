"""Benchmark compressed KV caches (`kv_quant`: KIVI codes; `kv_evict`: H2O eviction): exact
cache bytes at LLM shapes, and the decode step's memory and speed at a size this machine runs.

Part 1 (exact, nothing allocated): KV-cache bytes of 7B/8B-shaped models at several context
lengths, bf16 against 8/4/2-bit codes with groups of 32 (codes, scales, zeros and the
full-precision residual all counted) and H2O caches of 256 + 256 and 64 + 64 tokens (with
their positions and scores; `kv_cache_bytes`, checked against the abstract cache).
Part 2 (compiled): the --size model's decode step from a cache of N tokens: XLA's argument
bytes (weights + cache), temporaries (the XLA path dequantizes one layer at a time: its
full-precision keys and values are a temporary), and decode tokens/s (16 steps under one jit
after an N - 16 token prompt; the variants alternate, medians over --repeats).
Part 4 (exact, compiled, nothing run): the prefill's output (the cache) and temporaries for
the dense cache and H2O, whole and chunked (`prefill_table`).
Part 3 (the attention alone): device time per call of one layer's decode attention at
--size's kernel shape (`per_call_device_time`, fresh random caches per call so none is read
from L2): the dense cache's einsum step, `decode_attention`'s reference (XLA dequantizes the
layer) and, on an NVIDIA GPU, its Pallas kernel; bytes of cache read and GB/s.

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
from memx.kernels._dispatch import gpu_backend
from memx.kernels.attention import Mask
from memx.kernels.attention.reference import MASK_VALUE
from memx.kernels.kv_quant import KVQuant, decode_attention, init_quant_cache
from memx.models.config import ModelConfig
from memx.models.decode import cache_bytes, kv_cache_bytes
from memx.models.transformer import TransformerLM
from memx.nn.kv_evict import H2O
from memx.sparse.evaluate import decode_timer
from memx.timing import interleaved_medians, per_call_device_time
from memx.train.memory import compiled_memory

VARIANTS = {"dense": None, "kv8": KVQuant(8, 32), "kv4": KVQuant(4, 32),
            "kv2": KVQuant(2, 32), "kv2r128": KVQuant(2, 32, residual=128),
            "h2o256+256": H2O(256, 256), "h2o64+64": H2O(64, 64)}
# name → (n_layers, n_heads, n_kv_heads, head_dim): Llama-2-7B (MHA) and Llama-3-8B (GQA)
SHAPES = {"7b-mha": (32, 32, 32, 128), "8b-gqa": (32, 32, 8, 128)}
LENGTHS = (4096, 32768, 131072)
NEW_TOKENS = 16
# size → (d_model, n_layers, n_heads, n_kv_heads, vocab, N, batch, compute dtype)
SIZES = {"cpu": (512, 4, 8, 4, 8192, 2048, 4, "float32"),
         "gpu": (2048, 8, 16, 8, 32000, 16384, 8, "bfloat16"),
         "tiny": (64, 1, 2, 2, 264, 64, 1, "float32")}  # tiny: the script's test
# size → (batch, N, KV heads, query heads per KV head, head_dim, argument sets) for part 3
KERNEL_SHAPES = {"cpu": (2, 2048, 4, 2, 64, 2), "gpu": (8, 16384, 8, 4, 128, 4),
                 "tiny": (1, 128, 2, 2, 32, 2)}


def _cache_kw(spec) -> dict:
  """The cache argument for a variant: kv_quant for KIVI codes, kv_evict for H2O."""
  return {"kv_evict": spec} if isinstance(spec, H2O) else {"kv_quant": spec}


def cache_table() -> list[dict]:
  rows = []
  for shape, (layers, heads, kv_heads, hd) in SHAPES.items():
    cfg = ModelConfig(vocab_size=256, d_model=heads * hd, n_layers=layers, n_heads=heads,
                      n_kv_heads=kv_heads, compute_dtype="bfloat16")
    for n in LENGTHS:
      dense = kv_cache_bytes(cfg, n)
      for name, spec in VARIANTS.items():
        b = kv_cache_bytes(cfg, n, **_cache_kw(spec))
        rows.append({"part": "bytes", "shape": shape, "N": n, "cache": name,
                     "GiB": b / 2**30, "bytes_per_token": b / n, "x_bf16": b / dense})
  # The count is the cache's: the abstract cache of one shape at one length.
  cfg = ModelConfig(vocab_size=256, d_model=1024, n_layers=2, n_heads=8, n_kv_heads=8,
                    compute_dtype="bfloat16")
  model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  for spec in VARIANTS.values():
    abstract = jax.eval_shape(lambda s=spec: model.init_cache(1, 4096, **_cache_kw(s)))
    assert cache_bytes(abstract) - 4 == kv_cache_bytes(cfg, 4096, **_cache_kw(spec))  # - "pos"
  return rows


def decode_table(size: str, repeats: int) -> list[dict]:
  d, layers, heads, kv_heads, vocab, n, batch, dtype = SIZES[size]
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                    n_kv_heads=kv_heads, compute_dtype=dtype)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rows = {}
  for name, spec in VARIANTS.items():
    cache = jax.eval_shape(lambda s=spec: model.init_cache(batch, n, **_cache_kw(s)))
    step = jax.jit(lambda st, c, t: nnx.merge(graphdef, st).decode_step(t, c), donate_argnums=1)
    mem = compiled_memory(step.lower(state, cache, jax.ShapeDtypeStruct((batch,), jnp.int32))
                          .compile())
    rows[name] = {"part": "decode", "size": size, "N": n, "batch": batch, "cache": name,
                  "kv_MiB": kv_cache_bytes(cfg, n, batch, **_cache_kw(spec)) / 2**20,
                  "argument_MiB": mem["argument_bytes"] / 2**20,
                  "temp_MiB": mem["temp_bytes"] / 2**20}
  timers = [decode_timer(model, n, new_tokens=NEW_TOKENS, batch=batch, **_cache_kw(spec))
            for spec in VARIANTS.values()]
  seconds = interleaved_medians(timers, (), repeats)
  for row, sec in zip(rows.values(), seconds, strict=True):
    row["tokens_per_s"] = batch * NEW_TOKENS / sec
    row["argument_x_dense"] = row["argument_MiB"] / rows["dense"]["argument_MiB"]
    row["speed_x_dense"] = seconds[0] / sec
  return list(rows.values())


def _dense_step(q, k, v, pos):
  """The dense cache's decode attention (as memx.nn.attention_decode's step): q [B, H, K] over
  k, v [B, S, G, K], keys up to pos."""
  b, h, d = q.shape
  s, g = k.shape[1:3]
  qg = q.reshape(b, g, h // g, d)
  scores = jnp.einsum("bgrk,bsgk->bgrs", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
  scores = jnp.where((jnp.arange(s) <= pos)[None, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrs,bsgk->bgrk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, h, d).astype(q.dtype)


def _random_cache(spec, key, b, n, g, d, dtype):
  """A cache full of random keys and values (never zeros: they can run faster than data)."""
  k, v = (jax.random.normal(kk, (b, n, g, d), jnp.float32).astype(dtype)
          for kk in jax.random.split(key))
  if spec is None:
    return k, v
  cache = init_quant_cache(spec, b, n, g, d, dtype)
  return cache.append(k[:, :n - 1], v[:, :n - 1], 0, 0).step(k[:, n - 1:], v[:, n - 1:],
                                                               jnp.int32(n - 1))


def kernel_table(size: str, repeats: int) -> list[dict]:
  b, n, g, r, d, copies = KERNEL_SHAPES[size]
  dtype = jnp.bfloat16 if size == "gpu" else jnp.float32
  pos = jnp.int32(n - 1)
  mask = Mask(causal=True)
  variants = [("dense", None, None)]
  impls = ("reference", "pallas_gpu") if gpu_backend() else ("reference",)
  for name, spec in VARIANTS.items():
    if isinstance(spec, KVQuant):  # the quantized cache's decode kernel (H2O reads a dense one)
      variants += [(f"{name} {impl}", spec, impl) for impl in impls]
  rows = []
  for i, (name, spec, impl) in enumerate(variants):
    caches = [_random_cache(spec, jax.random.key(100 * i + c), b, n, g, d, dtype)
              for c in range(copies)]
    q = jax.random.normal(jax.random.key(7), (b, g * r, d), jnp.float32).astype(dtype)
    if spec is None:
      fn = lambda q, kv: _dense_step(q, *kv, pos)  # noqa: E731
    else:
      fn = lambda q, c, m=impl: decode_attention(q, c, pos, mask=mask,  # noqa: E731
                                                         implementation=m)
    seconds = per_call_device_time(fn, [(q, c) for c in caches] * 2, repeats)
    read = cache_bytes(caches[0])
    rows.append({"part": "attention", "size": size, "B": b, "N": n, "kv_heads": g,
                 "q_per_kv": r, "head_dim": d, "cache": name, "cache_MiB": read / 2**20,
                 "us": 1e6 * seconds, "GB_per_s": read / seconds / 1e9})
  for row in rows:
    row["x_dense_time"] = row["us"] / rows[0]["us"]
  return rows


def prefill_table(size: str) -> list[dict]:
  """Compiled memory of prefilling an N - 16 token prompt at --size (exact, nothing run): the
  dense cache and H2O 256 + 256, each whole and in chunks of N / 8 (scanned). The output is the
  cache (plus the last logits); temporaries hold the activations and, for H2O's whole-prompt
  selection, the prompt's keys and values before they are chosen."""
  d, layers, heads, kv_heads, vocab, n, batch, dtype = SIZES[size]
  cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                    n_kv_heads=kv_heads, compute_dtype=dtype)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  prompt = jax.ShapeDtypeStruct((batch, n - NEW_TOKENS), jnp.int32)
  chunk = max((n - NEW_TOKENS) // 8, 1)
  rows = []
  for name, spec in (("dense", None), ("h2o256+256", H2O(256, 256))):
    for chunk_size in (None, chunk):
      fn = jax.jit(lambda st, p, s=spec, c=chunk_size: nnx.merge(graphdef, st).prefill(
          p, n, last_logits=True, chunk_size=c, kv_evict=s))
      mem = compiled_memory(fn.lower(state, prompt).compile())
      rows.append({"part": "prefill", "size": size, "N": n, "batch": batch, "cache": name,
                   "chunk": chunk_size or n - NEW_TOKENS,
                   "output_MiB": mem["output_bytes"] / 2**20,
                   "temp_MiB": mem["temp_bytes"] / 2**20})
  for row in rows:
    row["output_plus_temp_x_dense_whole"] = (row["output_MiB"] + row["temp_MiB"]) / (
        rows[0]["output_MiB"] + rows[0]["temp_MiB"])
  return rows


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
  print(write_results(f"{args.out}/attention", "bench_kv_quant (attention)", settings,
                      kernel_table(args.size, args.repeats)))
  print(write_results(f"{args.out}/decode", "bench_kv_quant (decode)", settings,
                      decode_table(args.size, args.repeats)))
  print(write_results(f"{args.out}/prefill", "bench_kv_quant (prefill)", settings,
                      prefill_table(args.size)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
