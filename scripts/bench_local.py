"""Benchmark local learning (`local.groups`): the train step's memory and time against backprop.

One process compiles the train step of the same model, data and batch under each variant and
times the bare AOT step (as bench_microbatch), the variants alternating so machine noise hits
them alike. Recorded: XLA's compiled temporary bytes (exact), the parameter bytes (the
auxiliary networks add theirs), step time, each with its ratio to end-to-end backprop.

Variants: backprop; the usual ways to cut activation memory at the same batch (remat "full" and
"dots", 4 microbatches); local learning at 2, 4 and 8 groups with auxiliary depths 0 (a probe:
norm + output projection), 1 and 2 (AugLocal's pyramid, or flat), MAN's moving-average blocks;
and "G4-d1-nobarrier": the same gradient without the hand-over barrier between groups
(memx.train.local.hand_over), which shows what the schedule, not the math, saves.

  python scripts/bench_local.py --out benchmarks/out/local                 # CPU
  python scripts/bench_local.py --out $OUT/local --size gpu                # bf16
"""

import argparse
import subprocess
import sys
import time

import jax

from memx.benchmark import compile_train_step, interleaved_medians, write_results
from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  LocalConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)
from memx.train import local
from memx.train.memory import compiled_memory

# size → (d_model, n_layers, n_heads, vocab, seq_len, batch, steps per timing)
SIZES = {"cpu": (256, 8, 4, 2048, 512, 8, 2), "gpu": (1024, 16, 16, 32000, 2048, 16, 5),
         "tiny": (32, 4, 2, 264, 32, 8, 1)}  # tiny: the script's test

# name → (remat, microbatches, LocalConfig fields or None, hand-over barrier)
VARIANTS = {
    "backprop": ("none", 1, None, True),
    "remat-full": ("full", 1, None, True),
    "remat-dots": ("dots", 1, None, True),
    "microbatch-4": ("none", 4, None, True),
    "G2-d1": ("none", 1, dict(groups=2, aux_depth=1), True),
    "G4-d0": ("none", 1, dict(groups=4, aux_depth=0), True),
    "G4-d1": ("none", 1, dict(groups=4, aux_depth=1), True),
    "G4-d2": ("none", 1, dict(groups=4, aux_depth=2), True),
    "G4-d2-flat": ("none", 1, dict(groups=4, aux_depth=2, aux_decay=False), True),
    "G4-d1-MAN": ("none", 1, dict(groups=4, aux_depth=1, aux_weights="ema"), True),
    "G8-d0": ("none", 1, dict(groups=8, aux_depth=0), True),
    "G4-d1-remat": ("full", 1, dict(groups=4, aux_depth=1), True),
    "G4-d1-nobarrier": ("none", 1, dict(groups=4, aux_depth=1), False),
}


def make_config(size: str, variant: str) -> Config:
  d, layers, heads, vocab, seq, batch, steps = SIZES[size]
  remat, micro, fields, _ = VARIANTS[variant]
  return Config(
      model=ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                        remat=remat, compute_dtype="bfloat16" if size == "gpu" else "float32"),
      data=DataConfig(source="corpus", seq_len=seq),
      optim=OptimConfig(warmup_steps=2),
      train=TrainConfig(steps=steps, batch_size=batch, log_every=steps, eval_batches=1,
                        microbatches=micro),
      local=LocalConfig(**(fields or {})),
      checkpoint=CheckpointConfig(enabled=False))


def _compile(cfg: Config, barrier: bool):
  if barrier:
    return compile_train_step(cfg)
  keep = local.hand_over
  local.hand_over = lambda out, grads: (out, grads)  # the ablation: no schedule
  try:
    return compile_train_step(cfg)
  finally:
    local.hand_over = keep


def _timer(compiled, state, batch, steps: int):
  box = [state]

  def timer():
    t0 = time.perf_counter()
    for _ in range(steps):
      box[0], metrics = compiled(box[0], batch)
    jax.block_until_ready((box[0], metrics))
    return (time.perf_counter() - t0) / steps

  return timer


def measure(size: str, variants: list[str], repeats: int) -> list[dict]:
  compiled, params, timers = {}, {}, {}
  for v in variants:
    cfg = make_config(size, v)
    compiled[v], state, batch = _compile(cfg, VARIANTS[v][3])
    params[v] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state[0]))
    timers[v] = _timer(compiled[v], state, batch, cfg.train.steps)
  seconds = interleaved_medians(timers, repeats)
  rows = []
  for v in variants:
    mem = compiled_memory(compiled[v])
    rows.append({"variant": v, "step_ms": 1e3 * seconds[v], "temp_MiB": mem["temp_bytes"] / 2**20,
                 "param_MiB": params[v] / 2**20})
  base = rows[0]
  for r in rows:
    r["temp_x_backprop"] = r["temp_MiB"] / base["temp_MiB"]
    r["time_x_backprop"] = r["step_ms"] / base["step_ms"]
  return rows


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out/local")
  p.add_argument("--size", default="cpu", choices=sorted(SIZES))
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated, the first is the baseline; from {list(VARIANTS)}")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  variants = args.variants.split(",")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or args.repeats < 1:
    p.error(f"unknown variants {unknown} (known: {list(VARIANTS)}); --repeats must be >= 1")
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  d, layers, heads, vocab, seq, batch, steps = SIZES[args.size]
  settings = {"commit": sha, "size": args.size, "d_model": d, "n_layers": layers,
              "n_heads": heads, "vocab": vocab, "seq_len": seq, "batch": batch,
              "steps_per_timing": steps, "repeats": args.repeats,
              "devices": jax.device_count(), "backend": jax.default_backend()}
  rows = measure(args.size, variants, args.repeats)
  print(write_results(args.out, "bench_local", settings, rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
