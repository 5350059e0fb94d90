"""Shared by scripts/bench_*.py: one output rule (results.json and a Markdown table of its
rows) and the bare AOT-compiled train step they time."""

import datetime
import json
import os
import pathlib
import time

import jax


def write_results(out: str | os.PathLike, title: str, settings: dict, rows: list[dict]) -> str:
  """Writes OUT/results.json (date, device, jax version, settings, rows) and OUT/results.md (one
  table row per dict); each file appears whole or not at all. Returns the Markdown."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "settings": settings, "rows": rows}
  keys = list(rows[0]) if rows else []
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  md = "\n".join([f"# {title} ({result['device']}, {result['date']})", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                 + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]) + "\n"
  for name, text in (("results.json", json.dumps(result, indent=2)), ("results.md", md)):
    tmp = out / f"{name}.tmp"
    tmp.write_text(text)
    tmp.replace(out / name)
  return md


def compile_train_step(cfg):
  """(compiled donated train step, its state, one fixed device batch) of a run config, on the
  mesh of cfg.parallel, after one warm-up call: the bare step that benchmarks time."""
  from memx.data import make_loader
  from memx.parallel.axes import BATCH
  from memx.parallel.mesh import batch_sharding, make_mesh
  from memx.parallel.rules import RULES, shards
  from memx.train.loop import split_seeds
  from memx.train.microbatch import check_split
  from memx.train.step import init_state, make_train_step, state_shardings

  mesh = make_mesh(cfg.parallel)
  check_split(cfg.train, shards(dict(RULES[cfg.parallel.strategy])[BATCH], dict(mesh.shape)))
  ts = init_state(cfg, split_seeds(cfg.train.seed).model_key)
  shardings = state_shardings(ts.state, mesh, cfg.parallel.strategy)
  state = jax.device_put(ts.state, shardings)
  batch = make_loader(cfg.data, batch_size=cfg.train.batch_size, seed=0,
                      split="train").global_batch(0, batch_sharding(mesh, cfg.parallel.strategy))
  compiled = jax.jit(make_train_step(cfg, ts.graphdef), donate_argnums=0,
                     out_shardings=(shardings, None)).lower(state, batch).compile()
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  return compiled, state, batch


def time_steps(compiled, state, batch, n: int):
  """(seconds per step over n calls of the compiled step, the state it leaves)."""
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = compiled(state, batch)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / n, state


def interleaved_medians(timers: dict, repeats: int) -> dict:
  """{key: median of timer()} over `repeats` rounds; each round calls every timer (a
  no-argument callable returning seconds) in turn, so machine noise hits them alike."""
  import statistics

  times = {k: [] for k in timers}
  for _ in range(repeats):
    for k, timer in timers.items():
      times[k].append(timer())
  return {k: statistics.median(v) for k, v in times.items()}


def compare_steps(configs: dict, repeats: int) -> dict[str, dict]:
  """The bare train step of each run config, compiled once, timed in interleaved rounds
  (medians over `repeats`): {name: {"step_s", "argument_bytes", "temp_bytes", ...}}, XLA's
  compiled memory beside the time."""
  from memx.train.memory import compiled_memory

  runs, timers = {}, {}
  for name, cfg in configs.items():
    runs[name] = [cfg, *compile_train_step(cfg)]

    def timer(run=runs[name]):
      seconds, run[2] = time_steps(run[1], run[2], run[3], run[0].train.steps)
      return seconds

    timers[name] = timer
  seconds = interleaved_medians(timers, repeats)
  return {name: {"step_s": seconds[name], **compiled_memory(runs[name][1])} for name in configs}
