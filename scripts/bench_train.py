"""Benchmark the training step and loop: tokens/s, MFU, compiled memory, loop overhead.

For each model size, in one process:
  bare  — the AOT-compiled train step called in a plain Python loop on one fixed device batch;
  loop  — memx.train.loop.train (data loading, metric fetches every log_every steps, JSONL and
          TensorBoard writes, progress bar), throughput from its summary (median interval rate).
Overhead = bare tokens/s ÷ loop tokens/s − 1; the goal is ≤ 5%. Memory: XLA's analysis of the
compiled step, and process_peak_bytes, the device allocator's peak over the whole process (GPU):
the bare state stays alive while the loop trains its own, and earlier sizes count too, so it is
an upper bound, not one step's need.

  python scripts/bench_train.py --out benchmarks/out            # CPU sizes
  python scripts/bench_train.py --out $OUT --sizes gpu          # GPU sizes, bf16
"""

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

import jax

from memx._io import atomic_file, write_json
from memx.benchmark import compile_train_step, time_steps
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.costs import hardware_of, train_flops_per_token
from memx.train.loop import train
from memx.train.memory import compiled_memory, peak_device_bytes

# name → (d_model, n_layers, n_heads, seq_len, batch, steps)
SIZES = {
    "cpu": {"xs": (64, 2, 4, 128, 8, 200), "s": (128, 4, 4, 256, 8, 100),
            "m": (256, 4, 8, 256, 8, 50)},
    "gpu": {"125m": (768, 12, 12, 1024, 32, 60), "350m": (1024, 24, 16, 1024, 16, 40),
            "760m": (1536, 24, 16, 1024, 8, 30)},
}
def make_config(size, bf16: bool) -> Config:
  d, layers, heads, seq, batch, steps = size
  dt = "bfloat16" if bf16 else "float32"
  return Config(
      model=ModelConfig(vocab_size=512, d_model=d, n_layers=layers, n_heads=heads,
                        compute_dtype=dt),
      data=DataConfig(source="corpus", seq_len=seq),
      optim=OptimConfig(warmup_steps=5),
      train=TrainConfig(steps=steps, batch_size=batch, log_every=10, eval_batches=1),
      checkpoint=CheckpointConfig(enabled=False),
  )


def compile_bare(cfg: Config):
  """The AOT-compiled step, its state, one fixed device batch and the model FLOPs per token."""
  compiled, state, batch = compile_train_step(cfg)
  return compiled, state, batch, train_flops_per_token(cfg, state[0])


def loop_tokens_per_s(cfg: Config) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    return train(cfg, pathlib.Path(tmp), progress=False, name="loop")["tokens_per_s"]


def measure(cfg: Config, repeats: int) -> dict:
  """Bare and loop measurements alternate, so machine noise hits both alike."""
  compiled, state, batch, flops_per_token = compile_bare(cfg)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = flops_per_token * tokens
  bare, loop = [], []
  for _ in range(repeats):
    step_s, state = time_steps(compiled, state, batch, cfg.train.steps)
    bare.append(tokens / step_s)
    loop.append(loop_tokens_per_s(cfg))
  bare_rate = statistics.median(bare)
  return {"bare_tokens_per_s": bare_rate, "loop_tokens_per_s": statistics.median(loop),
          "step_s": tokens / bare_rate, "flops_per_step": flops,
          "memory": compiled_memory(compiled), "process_peak_bytes": peak_device_bytes()}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="benchmarks/out")
  p.add_argument("--sizes", default="cpu", choices=sorted(SIZES))
  p.add_argument("--only", default=None, help="comma-separated size names")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  bf16 = args.sizes == "gpu"
  dev = jax.devices()[0]
  hw = hardware_of(dev)
  peak = None if hw is None else hw.bf16_flops
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  meta = {"date": datetime.date.today().isoformat(), "commit": sha, "device": dev.device_kind,
          "platform": dev.platform, "devices": jax.device_count(), "jax": jax.__version__}
  rows = []
  for name, size in SIZES[args.sizes].items():
    if args.only and name not in args.only.split(","):
      continue
    cfg = make_config(size, bf16)
    r = measure(cfg, args.repeats)
    achieved = r["flops_per_step"] / r["step_s"]
    rows.append({
        "size": name, "d_model": size[0], "n_layers": size[1], "seq_len": size[3],
        "batch": size[4], "dtype": "bf16" if bf16 else "fp32",
        "bare_tokens_per_s": r["bare_tokens_per_s"], "loop_tokens_per_s": r["loop_tokens_per_s"],
        "loop_overhead": r["bare_tokens_per_s"] / r["loop_tokens_per_s"] - 1.0,
        "step_ms": 1e3 * r["step_s"], "tflops": achieved / 1e12,
        "mfu": None if peak is None else achieved / peak,
        **r["memory"], "process_peak_bytes": r["process_peak_bytes"]})
    print(json.dumps(rows[-1]), flush=True)
    _write(out, meta, rows)  # after every size: a time limit keeps the sizes that finished
  print(_write(out, meta, rows))


def _write(out: pathlib.Path, meta: dict, rows: list[dict]) -> str:
  """bench_train.json and bench_train.md of the rows so far (atomically); returns the table."""
  write_json(out / "bench_train.json", {"meta": meta, "rows": rows})
  sha = meta["commit"]
  lines = [f"bench_train — {meta['device']} ×{meta['devices']}, jax {meta['jax']}, "
           f"{meta['date']}, commit {sha}", "",
           "| size | dtype | step ms | bare tok/s | loop tok/s | loop overhead | TFLOP/s | MFU "
           "| argument MiB | temp MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(
        f"| {r['size']} | {r['dtype']} | {r['step_ms']:.2f} | {r['bare_tokens_per_s']:,.0f} | "
        f"{r['loop_tokens_per_s']:,.0f} | {100 * r['loop_overhead']:+.1f}% | {r['tflops']:.3f} | "
        f"{mfu} | {r['argument_bytes'] / 2**20:.1f} | {r['temp_bytes'] / 2**20:.1f} |")
  with atomic_file(out / "bench_train.md") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
