"""Parallel strategies on fake CPU devices: per-device memory, step time, longest sequence.

Two measurements, in one process with N fake CPU devices (default 8):

  strategies  — one training step of a small model for each strategy and degree: the compiled
                step's per-device memory (exact: memory_analysis of the SPMD program, arguments
                + outputs − aliased + temporaries) and an indicative step time (median of a few
                steps; every fake device shares this machine's cores, so only ratios between
                rows of the same run mean anything).
  longest     — the longest sequence (batch 1) whose training step fits a per-device memory
                budget, per strategy: a binary search on the compiled memory, nothing runs.
                The goal: 8-way ring attention trains a sequence >= 7x longer than one device.

Sequence-parallel rows route attention through memx.parallel.sequence.sharded_attention, the
layer change proposed for memx/nn/attention.py (applied here by patching that module when the
layer does not do it yet). Ring rows use the contiguous layout: the zigzag one needs the
batch permuted in the train step (same memory; the balance shows in step time on a GPU).

  python scripts/bench_parallel.py --out benchmarks/out/parallel            # ~10 min, 2 cores
  python scripts/bench_parallel.py --out /tmp/bp --quick                    # ~2 min
Writes DIR/bench_parallel.json and DIR/bench_parallel.md.
"""

import argparse
import os
import sys

_p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_p.add_argument("--out", required=True, help="output directory")
_p.add_argument("--quick", action="store_true", help="fewer rows, coarser search (CI smoke)")
_p.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
_p.add_argument("--budget-mib", type=float, default=None,
                help="per-device memory budget of the longest-sequence search (default 512, "
                     "quick 128)")
_p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 3/2)")
_p.add_argument("--attn-block", type=int, default=128,
                help="attention tile size of every row (xla kernel and ring; 0 = their defaults)")
ARGS = _p.parse_args() if __name__ == "__main__" else None

if ARGS is not None:  # before JAX starts: the fake device count is fixed at backend creation
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from memx._xla_flags import set_cpu_flags
  set_cpu_flags(devices=ARGS.devices)  # (also the collective-order flag: see its docstring)

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import memx.nn.attention as nn_attention  # noqa: E402
from memx._io import atomic_file, write_json  # noqa: E402
from memx.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig  # noqa: E402
from memx.kernels._testing import FAST_CPU_COMPILE  # noqa: E402
from memx.kernels.attention import BlockSizes  # noqa: E402
from memx.kernels.attention import attention as kernel_attention  # noqa: E402
from memx.parallel import sequence  # noqa: E402
from memx.parallel.constrain import sharding_context  # noqa: E402
from memx.parallel.mesh import batch_sharding, make_mesh  # noqa: E402
from memx.parallel.rules import REQUIRED_AXES  # noqa: E402
from memx.parallel.sequence import sharded_attention  # noqa: E402
from memx.train.memory import compiled_memory  # noqa: E402
from memx.train.step import abstract_state, init_state, make_train_step, state_shardings  # noqa: E402

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Row:
  """One strategy on one mesh: name, strategy, {axis: size}, sequence method."""

  name: str
  strategy: str
  sizes: dict
  method: str = "ring"

  @property
  def degree(self) -> int:
    return int(np.prod(list(self.sizes.values())))

  def parallel(self) -> ParallelConfig:
    axes = REQUIRED_AXES[self.strategy]
    return ParallelConfig(strategy=self.strategy, mesh_axes=axes,
                          mesh_shape=tuple(self.sizes.get(a, 1) for a in axes),
                          sequence_method=self.method, sequence_layout="contiguous")


def route_attention_through_sp() -> None:
  """The proposed memx/nn/attention.py change, applied if the layer does not have it yet."""
  if getattr(nn_attention, "attention", None) is kernel_attention:
    nn_attention.attention = sharded_attention


def use_attention_tiles(block: int) -> None:
  """One tile size for every attention implementation of the run.

  Tile temporaries ([B, H, block, block] fp32 scores and friends) are a fixed cost per device;
  with the xla kernel's default 512 and the ring's batch-dependent default they would differ
  between rows for reasons that have nothing to do with the strategy.
  """
  if not block:
    return
  default = BlockSizes.get_default

  def get_default(cls, implementation: str = "pallas_gpu", **kw):
    if implementation == "xla":
      return cls(block_q=block, block_k=block, block_q_dkv=block, block_k_dkv=block,
                 block_q_dq=block, block_k_dq=block)
    return default(implementation, **kw)

  BlockSizes.get_default = classmethod(get_default)
  sequence.DEFAULT_BLOCK = block


def make_config(row: Row, *, d_model: int, n_layers: int, seq_len: int, batch: int,
                remat: str = "none") -> Config:
  return Config(
      model=ModelConfig(vocab_size=512, d_model=d_model, n_layers=n_layers, n_heads=8,
                        remat=remat, attn_impl="xla"),
      optim=OptimConfig(warmup_steps=0),
      train=TrainConfig(steps=10, batch_size=batch),
      parallel=row.parallel())


def _abstract_batch(cfg: Config, mesh, seq_len: int):
  sharding = batch_sharding(mesh, cfg.parallel.strategy)
  shape = (cfg.train.batch_size, seq_len)
  return {"inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding),
          "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding),
          "weights": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)}


def compile_step(cfg: Config, seq_len: int, *, abstract: bool):
  """(compiled step, mesh, state or None): donated state, as memx.train.loop compiles it."""
  devices = jax.devices()[:int(np.prod(cfg.parallel.mesh_shape))]
  mesh = make_mesh(cfg.parallel, devices)
  ts = (abstract_state if abstract else init_state)(cfg, jax.random.key(0))
  shardings = state_shardings(ts.state, mesh, cfg.parallel.strategy)
  if abstract:
    # One sharding per array leaf, in the same order (state_shardings maps Variable-wise).
    leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in
              zip(jax.tree.leaves(ts.state), jax.tree.leaves(shardings), strict=True)]
    state = jax.tree.unflatten(jax.tree.structure(ts.state), leaves)
  else:
    state = jax.device_put(ts.state, shardings)
  batch = _abstract_batch(cfg, mesh, seq_len)
  with sharding_context(mesh, cfg.parallel.strategy, sequence_method=cfg.parallel.sequence_method,
                        sequence_layout="contiguous"):
    lowered = jax.jit(make_train_step(cfg, ts.graphdef), donate_argnums=0,
                      out_shardings=(shardings, None)).lower(state, batch)
  # Memory-only compiles skip LLVM's expensive passes: same buffer assignment, ~1.5x faster.
  fast = abstract and jax.default_backend() == "cpu"
  compiled = lowered.compile(compiler_options=FAST_CPU_COMPILE if fast else None)
  return compiled, mesh, (None if abstract else state)


def per_device_bytes(compiled) -> int:
  m = compiled_memory(compiled)
  return m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]


def time_steps(compiled, state, cfg: Config, mesh, seq_len: int, steps: int) -> float:
  rng = np.random.default_rng(0)
  shape = (cfg.train.batch_size, seq_len)
  sharding = batch_sharding(mesh, cfg.parallel.strategy)
  batch = {"inputs": rng.integers(0, 512, shape).astype(np.int32),
           "targets": rng.integers(0, 512, shape).astype(np.int32),
           "weights": np.ones(shape, np.float32)}
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def strategy_rows(n: int, quick: bool) -> list[Row]:
  degrees = [d for d in ((n,) if quick else (2, 4, 8)) if 1 < d <= n]
  rows = [Row("1 device", "dp", {"data": 1})]
  for d in degrees:
    rows += [Row(f"dp{d}", "dp", {"data": d}), Row(f"fsdp{d}", "fsdp", {"fsdp": d}),
             Row(f"tp{d}", "tp", {"tensor": d}), Row(f"sp{d}-ring", "sp", {"seq": d}),
             Row(f"sp{d}-a2a", "sp", {"seq": d}, "all_to_all")]
  if n >= 8:
    rows += [Row("fsdp4xtp2", "fsdp_tp", {"fsdp": 4, "tensor": 2}),
             Row("fsdp2xsp4-ring", "fsdp_sp", {"fsdp": 2, "seq": 4}),
             Row("dp2xfsdp2xtp2", "fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2})]
  return rows


def bench_strategies(n: int, quick: bool, steps: int) -> list[dict]:
  d_model, n_layers, seq_len, batch = (64, 2, 256, 8) if quick else (128, 2, 512, 8)
  out = []
  for row in strategy_rows(n, quick):
    cfg = make_config(row, d_model=d_model, n_layers=n_layers, seq_len=seq_len, batch=batch)
    t0 = time.perf_counter()
    compiled, mesh, state = compile_step(cfg, seq_len, abstract=False)
    compile_s = time.perf_counter() - t0
    mem = compiled_memory(compiled)
    step_s = time_steps(compiled, state, cfg, mesh, seq_len, steps)
    out.append({"row": row.name, "strategy": row.strategy, "mesh": row.sizes,
                "method": row.method if "sp" in row.strategy else None, "degree": row.degree,
                "per_device_bytes": per_device_bytes(compiled), **mem,
                "step_s": step_s, "compile_s": compile_s,
                "model": {"d_model": d_model, "n_layers": n_layers, "seq_len": seq_len,
                          "batch": batch}})
    print(f"  {row.name:16s} {out[-1]['per_device_bytes'] / MiB:8.2f} MiB/device  "
          f"{step_s * 1e3:8.1f} ms/step", flush=True)
  return out


def longest_sequence(row: Row, budget: int, granule: int, *, d_model: int, n_layers: int,
                     max_len: int, rel_precision: float = 0.0) -> dict:
  """Largest multiple of `granule` whose step fits `budget` bytes per device (compile only).

  Stops bisecting once the bracket is within `rel_precision` of its lower end (0: exact to
  one granule); `max_seq_len` is always a length that was compiled and fits.
  """
  tried = {}

  def fits(t: int) -> bool:
    cfg = make_config(row, d_model=d_model, n_layers=n_layers, seq_len=t, batch=1,
                      remat="full")
    compiled, _, _ = compile_step(cfg, t, abstract=True)
    tried[t] = per_device_bytes(compiled)
    return tried[t] <= budget

  lo, hi = 0, granule
  while hi <= max_len and fits(hi):  # double until it does not fit
    lo, hi = hi, hi * 2
  hi = min(hi, max_len + granule)
  while hi - lo > max(granule, rel_precision * lo):  # invariant: lo fits (or 0), hi does not
    mid = (lo + hi) // 2 // granule * granule
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return {"row": row.name, "strategy": row.strategy, "mesh": row.sizes,
          "method": row.method if "sp" in row.strategy else None, "max_seq_len": lo,
          "bytes_at_max": tried.get(lo), "compiles": len(tried),
          "tried": {str(k): v for k, v in sorted(tried.items())}}


def bench_longest(n: int, quick: bool, budget: int) -> list[dict]:
  d_model, n_layers = (128, 2) if quick else (256, 2)
  max_len = 2 * n * 128 * (256 if quick else 1024)
  rows = [Row("1 device", "dp", {"data": 1})]
  if n > 1:
    rows += [Row(f"sp{n}-ring", "sp", {"seq": n}), Row(f"sp{n}-a2a", "sp", {"seq": n},
                                                      "all_to_all")]
    if not quick:
      rows.insert(1, Row(f"tp{n}", "tp", {"tensor": n}))
    if not quick and n >= 4:
      rows.append(Row(f"sp{n // 2}xtp2-ring", "sp_tp", {"seq": n // 2, "tensor": 2}))
  out = []
  for row in rows:
    t0 = time.perf_counter()
    # Multiples of 2·seq·128 tokens: each shard splits into 128-token tiles in any layout.
    granule = 2 * row.sizes.get("seq", 1) * 128
    res = longest_sequence(row, budget, granule, d_model=d_model, n_layers=n_layers,
                           max_len=max_len, rel_precision=0.1 if quick else 0.0)
    res["search_s"] = time.perf_counter() - t0
    out.append(res)
    print(f"  {row.name:16s} max seq {res['max_seq_len']:>8d} tokens  "
          f"({res['compiles']} compiles, {res['search_s']:.0f} s)", flush=True)
  base = out[0]["max_seq_len"] or 1
  for r in out:
    r["vs_one_device"] = r["max_seq_len"] / base
  return out


def _git() -> str:
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                           text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def markdown(result: dict) -> str:
  env = result["env"]
  lines = [f"# bench_parallel ({env['date']}, commit {env['commit']})", "",
           f"{env['devices']} fake {env['platform']} devices on {env['cpu_count']} cores; jax "
           f"{env['jax']}; attention tiles {env['attn_block'] or 'default'}. Memory is exact "
           "(compiled SPMD program, per device); step times "
           "share the machine's cores across all fake devices, so compare rows only within "
           "this run.", ""]
  if result["strategies"]:
    m = result["strategies"][0]["model"]
    lines += ["## Per-device memory and step time by strategy", "",
              f"Model d_model={m['d_model']}, {m['n_layers']} layers, 8 heads (MHA), "
              f"vocab 512; batch {m['batch']} x {m['seq_len']} tokens; AdamW; fp32.", "",
              "| row | strategy | mesh | per-device MiB | vs 1 device | step ms |",
              "|---|---|---|---:|---:|---:|"]
    one = result["strategies"][0]["per_device_bytes"]
    for r in result["strategies"]:
      ref = one
      mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
      lines.append(f"| {r['row']} | {r['strategy']} | {mesh} | "
                   f"{r['per_device_bytes'] / MiB:.2f} | {r['per_device_bytes'] / ref:.2f} | "
                   f"{r['step_s'] * 1e3:.1f} |")
    lines.append("")
  if result["longest"]:
    lines += ["## Longest trainable sequence under a per-device budget", "",
              f"Budget {result['budget_bytes'] / MiB:.0f} MiB per device (arguments + outputs "
              "- aliased + temporaries of the compiled step), batch 1, remat full, binary "
              "search on multiples of 2 x seq x 128 tokens.", "",
              "| row | mesh | max sequence | vs 1 device | MiB at max | compiles |",
              "|---|---|---:|---:|---:|---:|"]
    for r in result["longest"]:
      mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
      at = r["bytes_at_max"]
      lines.append(f"| {r['row']} | {mesh} | {r['max_seq_len']} | {r['vs_one_device']:.2f}x | "
                   f"{'-' if at is None else f'{at / MiB:.1f}'} | {r['compiles']} |")
    lines.append("")
  return "\n".join(lines)


def main(args) -> int:
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  n = jax.device_count()
  route_attention_through_sp()
  use_attention_tiles(args.attn_block)
  steps = args.steps or (2 if args.quick else 3)
  budget = int((args.budget_mib or (128 if args.quick else 512)) * MiB)
  env = {"date": datetime.date.today().isoformat(), "commit": _git(), "jax": jax.__version__,
         "platform": jax.devices()[0].platform, "devices": n, "cpu_count": os.cpu_count(),
         "argv": sys.argv[1:], "attn_block": args.attn_block}
  print(f"strategies ({n} devices):", flush=True)
  strategies = bench_strategies(n, args.quick, steps)
  # The strategy table first (a later failure or time limit keeps it), then the whole result.
  write_json(out_dir / "bench_parallel.json",
             {"env": env, "budget_bytes": budget, "strategies": strategies, "longest": []},
             indent=1)
  print(f"longest sequence under {budget / MiB:.0f} MiB per device:", flush=True)
  longest = bench_longest(n, args.quick, budget)
  result = {"env": env, "budget_bytes": budget, "strategies": strategies, "longest": longest}
  write_json(out_dir / "bench_parallel.json", result, indent=1)
  with atomic_file(out_dir / "bench_parallel.md") as f:
    f.write(markdown(result))
  print(markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(ARGS))
