"""Benchmark fine-tuning memory: full fine-tuning vs LoRA vs QLoRA (`finetune.*`), and the NF4
matmul the QLoRA forward runs on.

Part 1 (exact, nothing allocated): for each size and parameter dtype, the bytes of the model
(frozen bases, NF4 codes and scales, adapters) and of the optimizer state (AdamW), from the
abstract train state (memx.train.step.abstract_state), their ratio to full fine-tuning, and
what one device holds of them under 8-way FSDP.
Part 2 (compiled, one process): the train step of the --step-size model for each variant: XLA's
argument bytes (model + optimizer state + batch), temporaries (activations, gradients) and the
step time of the bare AOT step (the variants alternate, medians over --repeats).
Part 3 (compiled): y = x·W for a 4-bit W [K, N], NF4 (`nf4_matmul`, QLoRA's bases) and int4 in
groups of 128 (`intq_matmul`, GPTQ's format): each one's reference (dequantize, then one dot),
xla form (K chunks: the full-precision W never exists) and, on GPU, Pallas kernel, against a
plain float matmul: weight bytes, temporaries and time.

  python scripts/bench_lora.py --out benchmarks/out/lora                    # CPU
  python scripts/bench_lora.py --out $OUT/lora --step-size gpu             # bf16 compute
"""

import argparse
import dataclasses
import functools
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from memx.benchmark import compare_steps, interleaved_medians, write_results
from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  FinetuneConfig,
  ModelConfig,
  TrainConfig,
)
from memx.kernels import intq, nf4
from memx.train.loop import trainable_params
from memx.train.memory import compiled_memory
from memx.train.step import abstract_state, fsdp_device_bytes

VARIANTS = {"full": FinetuneConfig(), "lora_r16": FinetuneConfig(lora_rank=16),
            "lora_r64": FinetuneConfig(lora_rank=64),
            "qlora_r16": FinetuneConfig(lora_rank=16, quantize_base="nf4"),
            "qlora_r64": FinetuneConfig(lora_rank=64, quantize_base="nf4")}
# name → (d_model, n_layers, n_heads, vocab); 7b is LLaMA-7B's shape with a 32k vocabulary
SIZES = {"125m": (768, 12, 12, 32000), "1.3b": (2048, 24, 16, 32000),
         "7b": (4096, 32, 32, 32000)}
# step size → (d_model, n_layers, n_heads, vocab, seq_len, batch, steps per timing)
STEP_SIZES = {"cpu": (256, 4, 4, 8192, 256, 8, 2), "gpu": (1024, 12, 16, 32000, 1024, 16, 10),
              "tiny": (128, 1, 2, 264, 32, 8, 1)}  # tiny: the script's test
# matmul shapes (M, K, N): a decode step's and a training chunk's
MATMULS = {"cpu": ((16, 2048, 2048), (512, 2048, 2048)),
           "gpu": ((16, 4096, 4096), (4096, 4096, 4096)), "tiny": ((8, 128, 64),)}


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def state_bytes(sizes: list[str], names: list[str]) -> list[dict]:
  rows = []
  for size in sizes:
    d, layers, heads, vocab = SIZES[size]
    for dtype in ("float32", "bfloat16"):
      model = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                          param_dtype=dtype)
      base = None
      for name in names:
        cfg = Config(model=model, finetune=VARIANTS[name])
        ts = abstract_state(cfg, jax.random.key(0))
        m, o = _bytes(ts.state[0]), _bytes(ts.state[1])
        n_train = trainable_params(ts.state, cfg)
        base = m + o if base is None else base
        rows.append({"part": "state", "size": size, "param_dtype": dtype, "variant": name,
                     "trainable_M": n_train / 1e6, "model_MiB": m / 2**20,
                     "opt_state_MiB": o / 2**20, "total_MiB": (m + o) / 2**20,
                     "total_x_full": (m + o) / base,
                     "fsdp8_MiB_per_device": fsdp_device_bytes(ts.state) / 2**20})
  return rows


def step_config(step_size: str, finetune: FinetuneConfig) -> Config:
  d, layers, heads, vocab, seq, batch, steps = STEP_SIZES[step_size]
  gpu = step_size == "gpu"
  return Config(
      model=ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                        param_dtype="bfloat16" if gpu else "float32",
                        compute_dtype="bfloat16" if gpu else "float32"),
      data=DataConfig(source="corpus", seq_len=seq), finetune=finetune,
      train=TrainConfig(steps=steps, batch_size=batch, log_every=steps, eval_batches=1),
      checkpoint=CheckpointConfig(enabled=False))


def step_memory(step_size: str, repeats: int, names: list[str]) -> list[dict]:
  steps = compare_steps({n: step_config(step_size, VARIANTS[n]) for n in names}, repeats)
  rows = []
  for n in names:
    mem = steps[n]
    rows.append({"part": "step", "size": step_size, "variant": n,
                 "argument_MiB": mem["argument_bytes"] / 2**20,
                 "temp_MiB": mem["temp_bytes"] / 2**20, "step_ms": 1e3 * mem["step_s"]})
  for r in rows:
    r["argument_x_full"] = r["argument_MiB"] / rows[0]["argument_MiB"]
    r["temp_x_full"] = r["temp_MiB"] / rows[0]["temp_MiB"]
    r["time_x_full"] = r["step_ms"] / rows[0]["step_ms"]
  return rows


def matmul_rows(step_size: str, repeats: int) -> list[dict]:
  dtype = jnp.bfloat16 if step_size == "gpu" else jnp.float32
  rows = []
  for m, k, n in MATMULS[step_size]:
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
    codes, absmax = nf4.quantize(w)
    x = jax.random.normal(jax.random.key(1), (m, k), dtype)
    packed, scales, zeros = intq.quantize_rtn(w, 4, 128)
    packed = intq.pack(packed, 4)
    fns = {"dense": (lambda x, w: x @ w, (x, w.astype(dtype)))}
    for impl in ("reference", "xla") + (("pallas_gpu",) if step_size == "gpu" else ()):
      fns[f"nf4_{impl}"] = (
          lambda x, c, a, impl=impl: nf4.nf4_matmul(x, c, a, implementation=impl),
          (x, codes, absmax))
      fns[f"int4g128_{impl}"] = (
          lambda x, c, s, z, impl=impl: intq.intq_matmul(x, c, s, z, bits=4, group_size=128,
                                                         implementation=impl),
          (x, packed, scales, zeros))
    compiled = {name: jax.jit(f).lower(*args).compile() for name, (f, args) in fns.items()}

    seconds = interleaved_medians(
        {name: functools.partial(_time_call, compiled[name], fns[name][1]) for name in fns},
        repeats)
    for name in fns:
      mem = compiled_memory(compiled[name])
      rows.append({"part": "matmul", "shape": f"{m}x{k}x{n}", "impl": name,
                   "weight_MiB": _bytes(fns[name][1][1:]) / 2**20,
                   "temp_MiB": mem["temp_bytes"] / 2**20, "ms": 1e3 * seconds[name],
                   "time_x_dense": seconds[name] / seconds["dense"]})
  return rows


def _time_call(compiled, args, n: int = 5) -> float:
  jax.block_until_ready(compiled(*args))
  t0 = time.perf_counter()
  for _ in range(n):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out/lora")
  p.add_argument("--sizes", default=",".join(SIZES), help="state-byte sizes: " + ",".join(SIZES))
  p.add_argument("--step-size", default="cpu", choices=sorted(STEP_SIZES))
  p.add_argument("--variants", default=",".join(VARIANTS), help=",".join(VARIANTS))
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  sizes, names = args.sizes.split(","), args.variants.split(",")
  bad = sorted(set(sizes) - set(SIZES)) + sorted(set(names) - set(VARIANTS))
  if bad or args.repeats < 1 or names[0] != "full":
    p.error(f"unknown {bad}; --variants must start with full; --repeats >= 1")
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  settings = {"commit": sha, "step_size": args.step_size, "step_shape": STEP_SIZES[args.step_size],
              "repeats": args.repeats,
              "variants": {n: dataclasses.asdict(VARIANTS[n]) for n in names}}
  out = pathlib.Path(args.out)
  print(write_results(out, "bench_lora (state)", settings, state_bytes(sizes, names)))
  print(write_results(out / "matmul", "bench_lora (nf4 matmul)", settings,
                      matmul_rows(args.step_size, args.repeats)))
  print(write_results(out / "step", "bench_lora (step)", settings,
                      step_memory(args.step_size, args.repeats, names)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
