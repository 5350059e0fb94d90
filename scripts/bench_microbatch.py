"""Benchmark gradient accumulation (`train.microbatches`): memory and time at a fixed global batch.

For each microbatch count n, one process compiles the train step of the same model, data and
global batch, run as n microbatches (memx.train.microbatch), and times the bare AOT step (as
bench_train's "bare"), the counts alternating so machine noise hits them alike. Recorded:
compiled temporary bytes (exact: XLA's memory_analysis), argument bytes (the state and the
batch), step time and tokens/s, each with its ratio to n = 1. The temporaries are what the
microbatches cut (activations, logits and their gradients); the float32 gradient accumulator
is added once, about the parameters' size ("param_MiB").

  python scripts/bench_microbatch.py --out benchmarks/out/microbatch              # CPU
  python scripts/bench_microbatch.py --out $OUT/microbatch --size gpu             # bf16
"""

import argparse
import dataclasses
import subprocess
import sys
import time

import jax

from memx.benchmark import compile_train_step, interleaved_medians, write_results
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.train.memory import compiled_memory

# size → (d_model, n_layers, n_heads, vocab, seq_len, global batch, steps per timing)
SIZES = {"cpu": (256, 4, 4, 2048, 512, 16, 2), "gpu": (1024, 12, 16, 32000, 2048, 32, 5),
         "tiny": (32, 2, 2, 264, 32, 16, 1)}  # tiny: the script's test


def make_config(size: str, microbatches: int, vocab_block: int) -> Config:
  d, layers, heads, vocab, seq, batch, steps = SIZES[size]
  return Config(
      model=ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                        compute_dtype="bfloat16" if size == "gpu" else "float32"),
      data=DataConfig(source="corpus", seq_len=seq),
      optim=OptimConfig(warmup_steps=2),
      train=TrainConfig(steps=steps, batch_size=batch, log_every=steps, eval_batches=1,
                        microbatches=microbatches, loss_vocab_block=vocab_block),
      checkpoint=CheckpointConfig(enabled=False))


def _step_timer(compiled, state, batch, steps: int, *extra):
  """A timer of `steps` calls of a donated step (the state carried from call to call)."""
  box = [state]

  def timer():
    t0 = time.perf_counter()
    for _ in range(steps):
      box[0], metrics = compiled(box[0], *extra, batch)
    jax.block_until_ready((box[0], metrics))
    return (time.perf_counter() - t0) / steps

  return timer


def _param_bytes(state) -> int:
  """The model half's bytes (read before a donating step deletes the arrays)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state[0]))


def _rows(counts, cfg, compiled: dict, params: dict, seconds: dict) -> list[dict]:
  rows = []
  for n in counts:
    mem = compiled_memory(compiled[n])
    t = seconds[n]
    rows.append({"microbatches": n, "rows_per_microbatch": cfg.train.batch_size // n,
                 "step_ms": 1e3 * t, "tokens_per_s": cfg.train.batch_size * cfg.data.seq_len / t,
                 "temp_MiB": mem["temp_bytes"] / 2**20,
                 "argument_MiB": mem["argument_bytes"] / 2**20, "param_MiB": params[n] / 2**20})
  for r in rows:
    r["time_x_1"] = r["step_ms"] / rows[0]["step_ms"]
    r["temp_x_1"] = r["temp_MiB"] / rows[0]["temp_MiB"]
  return rows


def measure(size: str, counts: list[int], repeats: int, vocab_block: int = 0) -> list[dict]:
  cfg = make_config(size, 1, vocab_block)
  compiled, params, timers = {}, {}, {}
  for n in counts:
    compiled[n], state, batch = compile_train_step(make_config(size, n, vocab_block))
    params[n] = _param_bytes(state)
    timers[n] = _step_timer(compiled[n], state, batch, cfg.train.steps)
  return _rows(counts, cfg, compiled, params, interleaved_medians(timers, repeats))


def measure_distill(size: str, counts: list[int], repeats: int) -> list[dict]:
  """The same for a distillation stage-3 step (KL + CE, all student parameters train): a
  teacher of the size's shape (random weights: memory and time do not depend on training) and
  its hybrid student (every 2nd layer kept as attention); the teacher pass runs per
  microbatch too."""
  import jax.numpy as jnp
  from flax import nnx

  from memx.data import make_loader
  from memx.distill.config import STAGE3, StudentConfig
  from memx.distill.seed import build_student, converted_layers
  from memx.distill.stages import make_step, stage_optim, trainable_filter
  from memx.models.transformer import TransformerLM
  from memx.train.optim import make_optimizer

  cfg = make_config(size, 1, 0)
  teacher = TransformerLM(cfg.model, rngs=nnx.Rngs(0))
  kind = StudentConfig(kind="hybrid", every=2)
  layers = converted_layers(cfg.model, kind)
  student = build_student(teacher, kind)
  batch = {k: jnp.asarray(v) for k, v in make_loader(
      cfg.data, batch_size=cfg.train.batch_size, seed=0, split="train").local_batch(0).items()}
  t_graphdef, t_state = nnx.split(teacher)
  compiled, params, timers = {}, {}, {}
  for n in counts:
    stage = dataclasses.replace(STAGE3, ce_weight=0.5, batch_size=cfg.train.batch_size,
                                microbatches=n, steps=cfg.train.steps)
    filt = trainable_filter(stage.trainable, layers)
    opt = nnx.Optimizer(student, make_optimizer(stage_optim(stage), stage.steps), wrt=filt)
    graphdef, state = nnx.split((student, opt))
    state = jax.tree.map(jnp.copy, state)  # each count donates its own copy of the student
    params[n] = _param_bytes(state)
    compiled[n] = jax.jit(make_step(stage, graphdef, t_graphdef, layers, filt),
                          donate_argnums=0).lower(state, t_state, batch).compile()
    timers[n] = _step_timer(compiled[n], state, batch, cfg.train.steps, t_state)
    timers[n]()  # warm-up
  return _rows(counts, cfg, compiled, params, interleaved_medians(timers, repeats))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out/microbatch")
  p.add_argument("--size", default="cpu", choices=sorted(SIZES))
  p.add_argument("--counts", default="1,2,4,8", help="comma-separated microbatch counts")
  p.add_argument("--vocab-blocks", default="0",
                 help="comma-separated train.loss_vocab_block values, one table part each")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--distill", action="store_true",
                 help="also a distillation stage-3 step (teacher + hybrid student)")
  args = p.parse_args()
  counts = [int(c) for c in args.counts.split(",")]
  batch = SIZES[args.size][5]
  if args.repeats < 1 or counts[0] != 1 or any(c < 1 or batch % c for c in counts):
    p.error(f"--counts must start at 1 and divide the global batch {batch}; --repeats >= 1")
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  d, layers, heads, vocab, seq, batch, steps = SIZES[args.size]
  settings = {"commit": sha, "size": args.size, "d_model": d, "n_layers": layers,
              "n_heads": heads, "vocab": vocab, "seq_len": seq, "global_batch": batch,
              "steps_per_timing": steps, "repeats": args.repeats}
  rows = []
  for block in (int(b) for b in args.vocab_blocks.split(",")):
    rows += [{"step": "train", "loss_vocab_block": block, **r}
             for r in measure(args.size, counts, args.repeats, block)]
    md = write_results(args.out, "bench_microbatch", settings, rows)  # a time limit keeps these
  if args.distill:
    rows += [{"step": "distill stage 3", "loss_vocab_block": 0, **r}
             for r in measure_distill(args.size, counts, args.repeats)]
    md = write_results(args.out, "bench_microbatch", settings, rows)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
