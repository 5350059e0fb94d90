"""Benchmark frequent checkpointing against never, for the sync, async and lazy modes.

One process, one model sized so a step takes tens of milliseconds or more: for each mode the
loop trains with a checkpoint every step (CPU size) or every 80th step (GPU size: a write of
its 1.16 GiB state takes ~1.9 s on the H100 machine's disk, so closer saves measure the disk),
and once with checkpointing off. Reported per mode: the mean step time over the run (the
saving steps included: a median would hide them) and its overhead over "never"; per save, the
median main-thread blocking time, split into the wait for the previous save's write (the disk
not keeping up with the cadence) and the rest (the snapshot: device-to-host copy,
serialization).
Goals: lazy adds ≤ 5% to the step time where sync adds > 50%; lazy blocks ≥ 10× less than async.
A last row, "lazy (zstd)", is lazy with Orbax's default zstd compression (what every mode did
before `CheckpointConfig.compress` existed): it shows what storing arrays uncompressed buys.
Each run is a fresh process, so one run's threads or caches cannot leak into the next.

  python scripts/bench_checkpoint.py --out benchmarks/out            # CPU size
  python scripts/bench_checkpoint.py --out $OUT --size gpu           # GPU size, bf16
"""

import argparse
import concurrent.futures
import datetime
import multiprocessing
import pathlib
import statistics
import subprocess
import tempfile

import jax

from memx._io import atomic_file, write_json
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.train.loop import train

# name → (d_model, n_layers, n_heads, seq_len, batch, steps, save every). The GPU size saves
# every 80th step: its state is 1.16 GiB, a step 30 ms and one write ~1.9 s (H100, session 7),
# so each write ends before the next save. Saving every 5th step asked the disk for ~7 GB/s:
# every mode then waited ~2 s per save for the previous write, which measured the disk.
# "tiny" checks the script's plumbing (tests/checkpoint/test_bench_checkpoint.py, slow); its
# numbers mean nothing.
SIZES = {"cpu": (256, 4, 4, 256, 8, 24, 1), "gpu": (1024, 8, 16, 1024, 16, 250, 80),
         "tiny": (32, 1, 2, 32, 8, 4, 1)}


# row label → (mode, CheckpointConfig overrides); mode None = checkpointing off.
VARIANTS = {"never": (None, {}), "sync": ("sync", {}), "async": ("async", {}),
            "lazy": ("lazy", {}),
            "lazy (zstd)": ("lazy", {"compress": True})}


def make_config(size, mode: str | None, bf16: bool, **overrides) -> Config:
  d, layers, heads, seq, batch, steps, every = size
  return Config(
      model=ModelConfig(vocab_size=512, d_model=d, n_layers=layers, n_heads=heads,
                        compute_dtype="bfloat16" if bf16 else "float32"),
      data=DataConfig(source="corpus", seq_len=seq),
      optim=OptimConfig(warmup_steps=2),
      train=TrainConfig(steps=steps, batch_size=batch, log_every=1, eval_batches=1),
      checkpoint=CheckpointConfig(enabled=mode is not None, mode=mode or "lazy", every=every,
                                  keep=2, **overrides))


def measure_variant(size, label: str, bf16: bool) -> dict:
  mode, overrides = VARIANTS[label]
  return measure(make_config(size, mode, bf16, **overrides))


def measure(cfg: Config) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    s = train(cfg, pathlib.Path(tmp), progress=False, name="bench")
  return {"step_s": s["step_time_mean_s"], "median_step_s": s["step_time_s"],
          "blocking_s": s["checkpoint_blocking_s"], "write_wait_s": s["checkpoint_write_wait_s"],
          "checkpoint_bytes": s["checkpoint_bytes"], "state_bytes":
          s["param_bytes"] + s["opt_state_bytes"]}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="benchmarks/out")
  p.add_argument("--size", default="cpu", choices=sorted(SIZES))
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  size, bf16 = SIZES[args.size], args.size == "gpu"
  modes = list(VARIANTS)
  runs = {m: [] for m in modes}
  spawn = multiprocessing.get_context("spawn")
  for _ in range(args.repeats):  # interleaved, so machine noise hits every mode alike
    for m in modes:
      # One executor per run: leaving the `with` joins its process, so a GPU run's memory is
      # free before the next process starts (each preallocates most of the GPU).
      with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        runs[m].append(pool.submit(measure_variant, size, m, bf16).result())
      print(m, runs[m][-1], flush=True)
      # Written after every run, atomically: a bench stopped by a deadline (gpu_check's
      # per-bench limit) keeps the rows it finished.
      report(out, runs, size, args.repeats)


def report(out: pathlib.Path, runs: dict, size, repeats: int) -> None:
  """bench_checkpoint.json and .md from the runs so far (modes with at least one run)."""
  done = [m for m in runs if runs[m]]
  base = statistics.median(r["step_s"] for r in runs["never"]) if runs["never"] else None
  rows = []
  med = lambda m, key: None if m == "never" else 1e3 * statistics.median(r[key] for r in runs[m])  # noqa: E731
  for m in done:
    step = statistics.median(r["step_s"] for r in runs[m])
    rows.append({"mode": m, "step_ms": 1e3 * step, "runs": len(runs[m]),
                 "overhead": None if base is None else step / base - 1.0,
                 "median_step_ms": 1e3 * statistics.median(r["median_step_s"] for r in runs[m]),
                 "blocking_ms": med(m, "blocking_s"), "write_wait_ms": med(m, "write_wait_s"),
                 "checkpoint_bytes": runs[m][0]["checkpoint_bytes"],
                 "state_bytes": runs[m][0]["state_bytes"]})
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  dev = jax.devices()[0]
  meta = {"date": datetime.date.today().isoformat(), "commit": sha, "device": dev.device_kind,
          "size": dict(zip(("d_model", "n_layers", "n_heads", "seq_len", "batch", "steps",
                            "every"), size, strict=True)), "repeats": repeats}
  write_json(out / "bench_checkpoint.json", {"meta": meta, "rows": rows})
  lines = [f"bench_checkpoint — {meta['device']}, {meta['date']}, commit {sha}, "
           f"state {rows[0]['state_bytes'] / 2**20:.1f} MiB, checkpoint every {size[6]} step(s)",
           "",
           "| mode | runs | step ms (mean) | overhead vs never | step ms (median) | blocking ms "
           "per save | of which waiting for the previous write |",
           "|---|---|---|---|---|---|---|"]
  fmt = lambda x, spec=".2f": "–" if x is None else format(x, spec)  # noqa: E731
  for r in rows:
    overhead = "–" if r["overhead"] is None else f"{100 * r['overhead']:+.1f}%"
    lines.append(f"| {r['mode']} | {r['runs']} | {r['step_ms']:.1f} | {overhead} | "
                 f"{r['median_step_ms']:.1f} | {fmt(r['blocking_ms'])} | "
                 f"{fmt(r['write_wait_ms'])} |")
  with atomic_file(out / "bench_checkpoint.md") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)

if __name__ == "__main__":
  main()
