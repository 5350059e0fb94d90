"""The training loop: init or resume, AOT-compile, step, log, evaluate, checkpoint, summarise.

The loop's only host syncs are metric flushes (every train.log_every steps, before evals and
before checkpoints); between them steps are dispatched asynchronously while the host builds
the next batch.
"""

import dataclasses
import json
import math
import pathlib
import statistics
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from memx.checkpoint import Checkpointer
from memx.config import Config, to_dict
from memx.data import make_loader
from memx.errors import ConfigError, NonFiniteLossError
from memx.parallel.mesh import batch_sharding, make_mesh
from memx.train.memory import compiled_memory, peak_device_bytes
from memx.train.metrics import MetricsWriter, truncate_after
from memx.train.step import init_state, make_eval_step, make_train_step, state_shardings, tree_bytes


@dataclasses.dataclass
class Seeds:
  seed: int
  data_seed: int
  model_key: jax.Array


def split_seeds(seed: int) -> Seeds:
  """One seed → a key per purpose, split once at the top (Levanter)."""
  model_key, data_key = jax.random.split(jax.random.key(seed), 2)
  data_seed = int(jax.random.randint(data_key, (), 0, 2**31 - 1))
  return Seeds(seed, data_seed, model_key)


def _check_shapes(cfg: Config, mesh, vocab: int) -> None:
  data_size = mesh.shape["data"]
  if cfg.train.batch_size % (data_size * jax.process_count()):
    raise ConfigError(
        f"train.batch_size = {cfg.train.batch_size} is not allowed: it must be a multiple of the "
        f"data-parallel size {data_size} (mesh axis 'data') and of the {jax.process_count()} "
        "host(s).")
  if cfg.model.vocab_size < vocab:
    raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is not allowed: the data's "
                      f"tokenizer has {vocab} tokens; use at least that.")


def _task_eval_config(cfg: Config):
  """Accuracy is measured on the task alone, even when it is mixed into an LM source."""
  task = cfg.data.task_name
  if task is None or cfg.data.source == task:
    return None
  return dataclasses.replace(cfg.data, source=task, task=None, task_fraction=0.0)


def train(cfg: Config, run_dir: pathlib.Path | None = None, *, resume: bool = False,
          stop_at_step: int | None = None, progress: bool = True, name: str = "run") -> dict:
  """Trains `cfg` (writing metrics/checkpoints under run_dir when given); returns the summary.

  resume: continue from the newest checkpoint in run_dir/checkpoints if there is one.
  stop_at_step: stop (and checkpoint) after this many steps, keeping the schedule of
    train.steps: "train k, stop, resume, train N-k" equals "train N" bit for bit.
  """
  t_start = time.perf_counter()
  tc = cfg.train
  end = tc.steps if stop_at_step is None else min(stop_at_step, tc.steps)
  mesh = make_mesh(cfg.parallel)
  seeds = split_seeds(tc.seed)
  loader = make_loader(cfg.data, batch_size=tc.batch_size, seed=seeds.data_seed, split="train")
  eval_loader = make_loader(cfg.data, batch_size=tc.batch_size, seed=seeds.data_seed,
                            split="eval")
  task_cfg = _task_eval_config(cfg)
  task_loader = None if task_cfg is None else make_loader(
      task_cfg, batch_size=tc.batch_size, seed=seeds.data_seed, split="eval")
  _check_shapes(cfg, mesh, loader.vocab_size)
  bsh = batch_sharding(mesh)

  ts = init_state(cfg, seeds.model_key)
  shardings = state_shardings(ts.state, mesh, cfg.parallel.strategy)
  state = jax.device_put(ts.state, shardings)

  ckpt = None
  if run_dir is not None and cfg.checkpoint.enabled:
    ckpt = Checkpointer(pathlib.Path(run_dir) / "checkpoints", cfg.checkpoint)
  start = 0
  if resume and ckpt is not None and ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(ckpt.latest_step(), state)
    loader.restore(data_state)
    start = int(data_state["step"])
  if run_dir is not None:
    truncate_after(pathlib.Path(run_dir) / "metrics.jsonl", start)
  writer = MetricsWriter(run_dir if jax.process_index() == 0 else None)

  try:
    # Compile once ahead of time: the executable is what runs, and it reports its memory.
    example = loader.global_batch(start, bsh)
    step_fn = jax.jit(make_train_step(cfg, ts.graphdef), donate_argnums=0,
                      out_shardings=(shardings, None)).lower(state, example).compile()
    eval_fn = jax.jit(make_eval_step(ts.graphdef)).lower(state, example).compile()
    memory = compiled_memory(step_fn)

    bar = tqdm(total=end, initial=start, desc=name, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0, leave=True)
    pending: list[tuple[int, dict]] = []
    rates, recent_losses = [], []
    t_flush, steps_since = time.perf_counter(), 0
    tokens_per_step = tc.batch_size * cfg.data.seq_len

    def flush():
      nonlocal t_flush, steps_since
      if not pending:
        return
      host = jax.device_get([m for _, m in pending])
      now = time.perf_counter()
      rate = steps_since * tokens_per_step / max(now - t_flush, 1e-9)
      for (step, _), m in zip(pending, host, strict=True):
        loss = float(m["loss"])
        record = {"step": step, "split": "train", "loss": loss,
                  "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])}
        if step == pending[-1][0]:
          record["tokens_per_s"] = rate
        writer.write(record)
        if not math.isfinite(loss):
          raise NonFiniteLossError(step, loss)
        recent_losses.append(loss)
      if pending[0][0] > start + 1 or len(pending) == end - start:
        rates.append(rate)  # the first interval after compile includes warm-up: skip it
      del recent_losses[:-max(10, tc.log_every)]
      bar.update(len(pending))
      bar.set_postfix(loss=f"{recent_losses[-1]:.4f}")
      pending.clear()
      t_flush, steps_since = now, 0

    eval_metrics = {}
    for step in range(start, end):
      batch = example if step == start else loader.global_batch(step, bsh)
      state, metrics = step_fn(state, batch)
      done = step + 1
      pending.append((done, metrics))
      steps_since += 1
      eval_due = done == end or (tc.eval_every and done % tc.eval_every == 0)
      ckpt_due = ckpt is not None and (done % cfg.checkpoint.every == 0 or done == end)
      if done % tc.log_every == 0 or eval_due or ckpt_due:
        flush()
      if eval_due:
        eval_metrics = _evaluate(eval_fn, state, eval_loader, task_loader, tc.eval_batches, bsh)
        writer.write({"step": done, "split": "eval", **eval_metrics})
        t_flush = time.perf_counter()  # keep eval time out of the throughput
      if ckpt_due:
        loader.restore({"step": done})
        ckpt.save(done, state, loader.state(), {"config": to_dict(cfg)})
        t_flush = time.perf_counter()
    flush()
    bar.close()

    summary = {
        "name": name,
        "status": "done" if end == tc.steps else "stopped",
        "steps": end,
        "params": count_params_from_state(ts.state),
        "final_train_loss": statistics.fmean(recent_losses[-10:]) if recent_losses else None,
        "final_eval_loss": eval_metrics.get("loss"),
        "eval_perplexity": eval_metrics.get("perplexity"),
        "task_accuracy": eval_metrics.get("accuracy"),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "step_time_s": (tokens_per_step / statistics.median(rates)) if rates else None,
        "memory": {**memory, "peak_bytes": peak_device_bytes()},
        "param_bytes": tree_bytes(_params(ts.state)),
        "opt_state_bytes": tree_bytes(ts.state) - tree_bytes(_params(ts.state)),
        "checkpoint_bytes": None if ckpt is None else ckpt.size_bytes(),
        "wall_s": time.perf_counter() - t_start,
    }
    if run_dir is not None and jax.process_index() == 0:
      _atomic_json(pathlib.Path(run_dir) / "summary.json", summary)
    return summary
  finally:
    writer.close()
    if ckpt is not None:
      ckpt.close()


def _params(state):
  """The model half of the (model, optimizer) state: parameters only."""
  return state[0]


def count_params_from_state(state) -> int:
  return int(sum(x.size for x in jax.tree.leaves(_params(state))))


def _evaluate(eval_fn, state, loader, task_loader, n_batches: int, bsh) -> dict:
  def run(ld):
    sums = None
    for i in range(n_batches):
      out = eval_fn(state, ld.global_batch(i, bsh))
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    return {k: float(v) for k, v in jax.device_get(sums).items()}

  s = run(loader)
  loss = s["loss_sum"] / max(s["weight"], 1.0)
  out = {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0)))}
  if task_loader is not None:
    s = run(task_loader)
  if s["answers"] > 0:
    out["accuracy"] = s["correct"] / s["answers"]
  return out


def _atomic_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  tmp.replace(path)
