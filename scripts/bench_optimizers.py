"""Benchmark the optimizers' memory (`optim.name`, `optim.mu_dtype`, `optim.estimator`): exact
state bytes at LLM sizes, and the compiled train step at a size this machine runs (MeZO's
step has no backward pass: its temporaries are those of two forward passes).

Part 1 (exact, nothing allocated): for each size, the parameter and optimizer-state bytes from
the abstract train state (memx.train.step.abstract_state), the state's ratio to AdamW's, and
the state one device holds under 8-way FSDP (memx.train.step.state_shardings on an abstract
mesh: the largest shard of each array).
Part 2 (compiled, one process): the train step of the --step-size model for each optimizer:
XLA's argument bytes (parameters + optimizer state + batch), temporaries, and the step time of
the bare AOT step (the optimizers alternate, medians over --repeats).

  python scripts/bench_optimizers.py --out benchmarks/out/optimizers          # CPU
  python scripts/bench_optimizers.py --out $OUT/optimizers --step-size gpu    # bf16 compute
"""

import argparse
import pathlib
import subprocess
import sys

import jax

from memx.benchmark import compare_steps, write_results
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.train.step import abstract_state, fsdp_device_bytes

VARIANTS = {"adamw": OptimConfig(), "adamw_bf16mu": OptimConfig(mu_dtype="bfloat16"),
            "lion": OptimConfig(name="lion", lr=3e-4),
            "lion_bf16mu": OptimConfig(name="lion", lr=3e-4, mu_dtype="bfloat16"),
            "adafactor": OptimConfig(name="adafactor", lr=1e-2),
            "galore_r128": OptimConfig(name="galore", lr=1e-2, galore_rank=128),
            "apollo_r256": OptimConfig(name="apollo", lr=1e-2, apollo_rank=256),
            "apollo_mini": OptimConfig(name="apollo_mini", lr=1e-2),
            # COAT: both AdamW moments in FP8 E4M3 (group scales, dynamic range expansion).
            "adamw_fp8": OptimConfig(moment_quant="fp8"),
            "sgd": OptimConfig(name="sgd", lr=1e-2),
            # MeZO: SGD on SPSA estimates from two forward passes (no backward pass).
            "mezo_sgd": OptimConfig(name="sgd", lr=1e-6, estimator="mezo", clip_norm=None)}
# name → (d_model, n_layers, n_heads, vocab)
SIZES = {"125m": (768, 12, 12, 32000), "350m": (1024, 24, 16, 32000),
         "1.3b": (2048, 24, 16, 32000)}
# step size → (d_model, n_layers, n_heads, vocab, seq_len, batch, steps per timing)
STEP_SIZES = {"cpu": (256, 4, 4, 8192, 256, 8, 2), "gpu": (1024, 12, 16, 32000, 1024, 16, 10),
              "tiny": (128, 1, 2, 264, 32, 8, 1)}  # tiny: the script's test


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def state_bytes(sizes: list[str]) -> list[dict]:
  rows = []
  for size in sizes:
    d, layers, heads, vocab = SIZES[size]
    model = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads)
    base = None
    for name, optim in VARIANTS.items():
      ts = abstract_state(Config(model=model, optim=optim), jax.random.key(0))
      params, opt = _bytes(ts.state[0]), _bytes(ts.state[1])
      device = fsdp_device_bytes(ts.state)
      param_device = fsdp_device_bytes(ts.state[0])
      base = (opt, device - param_device) if base is None else base
      rows.append({"part": "state", "size": size, "optimizer": name,
                   "params_M": sum(x.size for x in jax.tree.leaves(ts.state[0])) / 1e6,
                   "param_MiB": params / 2**20, "opt_state_MiB": opt / 2**20,
                   "opt_per_param_bytes": opt / (params / 4), "opt_x_adamw": opt / base[0],
                   "fsdp8_opt_MiB_per_device": (device - param_device) / 2**20,
                   "fsdp8_opt_x_adamw": (device - param_device) / base[1]})
  return rows


def step_config(step_size: str, optim: OptimConfig) -> Config:
  d, layers, heads, vocab, seq, batch, steps = STEP_SIZES[step_size]
  return Config(
      model=ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                        compute_dtype="bfloat16" if step_size == "gpu" else "float32"),
      data=DataConfig(source="corpus", seq_len=seq), optim=optim,
      train=TrainConfig(steps=steps, batch_size=batch, log_every=steps, eval_batches=1),
      checkpoint=CheckpointConfig(enabled=False))


def step_memory(step_size: str, repeats: int, names: list[str]) -> list[dict]:
  steps = compare_steps({n: step_config(step_size, VARIANTS[n]) for n in names}, repeats)
  rows = []
  for n in names:
    mem = steps[n]
    rows.append({"part": "step", "size": step_size, "optimizer": n,
                 "argument_MiB": mem["argument_bytes"] / 2**20,
                 "temp_MiB": mem["temp_bytes"] / 2**20,
                 "step_ms": 1e3 * mem["step_s"]})
  for r in rows:
    r["argument_x_adamw"] = r["argument_MiB"] / rows[0]["argument_MiB"]
    r["temp_x_adamw"] = r["temp_MiB"] / rows[0]["temp_MiB"]
    r["time_x_adamw"] = r["step_ms"] / rows[0]["step_ms"]
  return rows


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out/optimizers")
  p.add_argument("--sizes", default=",".join(SIZES), help="state-byte sizes: " + ",".join(SIZES))
  p.add_argument("--step-size", default="cpu", choices=sorted(STEP_SIZES))
  p.add_argument("--optimizers", default=",".join(VARIANTS), help=",".join(VARIANTS))
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  sizes, names = args.sizes.split(","), args.optimizers.split(",")
  bad = sorted(set(sizes) - set(SIZES)) + sorted(set(names) - set(VARIANTS))
  if bad or args.repeats < 1 or names[0] != "adamw":
    p.error(f"unknown {bad}; --optimizers must start with adamw; --repeats >= 1")
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  settings = {"commit": sha, "step_size": args.step_size, "step_shape": STEP_SIZES[args.step_size],
              "repeats": args.repeats}
  # The state table first (exact, quick): a time limit on the step part keeps it.
  print(write_results(args.out, "bench_optimizers (state)", settings, state_bytes(sizes)))
  steps = step_memory(args.step_size, args.repeats, names)
  print(write_results(pathlib.Path(args.out) / "step", "bench_optimizers (step)", settings, steps))
  return 0


if __name__ == "__main__":
  sys.exit(main())
