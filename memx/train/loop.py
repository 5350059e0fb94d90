"""The training loop: init or resume, AOT-compile, step, log, evaluate, checkpoint, summarise.

Host syncs happen only at metric flushes (every train.log_every steps, before evals) and at
checkpoints; between them steps are dispatched asynchronously while the host builds the next
batch.

Checkpoint of step k. A state is saved only once a loss computed *from* it is known to be
finite, so a NaN never reaches a checkpoint: step k+1 runs as two programs, forward+backward
(reads state k, gives loss k+1) and the optimizer update (donates state k). Between them the
loop checks loss k+1 and saves state k; in lazy mode the device-to-host copy of state k runs
during that forward+backward (memx/checkpoint/manager.py). The last step's state is checked
with an evaluation pass on the next training batch before its save.
"""

import dataclasses
import functools
import json
import math
import pathlib
import signal
import statistics
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from memx._io import write_json
from memx._validate import describe_differences
from memx.checkpoint import Checkpointer
from memx.config import Config, FinetuneConfig, to_dict
from memx.data import check_training_mix, make_loader
from memx.data.documents import check_model
from memx.errors import ConfigError, NonFiniteLossError, Preempted
from memx.kernels._dispatch import gpu_backend
from memx.parallel.axes import BATCH
from memx.parallel.constrain import sharding_context
from memx.parallel.mesh import batch_sharding, make_mesh
from memx.parallel.rules import RULES, shards
from memx.parallel.validate import validate_for_model
from memx.train import finetune, kd, local, microbatch
from memx.train.memory import compiled_memory, peak_device_bytes
from memx.train.metrics import MetricsWriter, resumed_history, truncate_after
from memx.train.step import (
  init_state,
  make_apply_step,
  make_eval_step,
  make_grad_step,
  make_train_step,
  state_shardings,
  tree_bytes,
)


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


def run_identity(cfg: Config) -> dict:
  """What a checkpoint must share with the run resuming it. Optimizer settings and
  train.steps may change on resume (a lower lr after a divergence, a longer run)."""
  identity = {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "seed": cfg.train.seed}
  ft = to_dict(cfg.finetune)
  ft.pop("base")  # a base run may move; the weights it gave are in the checkpoint
  if ft != {k: v for k, v in to_dict(FinetuneConfig()).items() if k != "base"}:
    identity["finetune"] = ft  # (left out at the defaults: checkpoints from before still match)
  if cfg.local.groups > 1:  # the auxiliary networks are part of the checkpointed model
    identity["local"] = to_dict(cfg.local)
  return json.loads(json.dumps(identity))  # as stored: tuples become lists


def _task_eval_config(cfg: Config):
  """Accuracy is measured on the task alone, even when it is mixed into an LM source."""
  task = cfg.data.task_name
  if task is None or cfg.data.source == task:
    return None
  return cfg.data.task_only()


@dataclasses.dataclass
class Setup:
  """Everything built from a config before any compute; building it validates the config."""

  mesh: jax.sharding.Mesh
  seeds: Seeds
  loader: object
  eval_loader: object
  task_loader: object | None


def prepare(cfg: Config, *, resuming: bool = False) -> Setup:
  """Builds mesh and loaders and checks shapes: every user error surfaces here, cheaply.
  resuming: the run continues from its own checkpoint (a fine-tune's base run is not read)."""
  tc = cfg.train
  finetune.check(cfg, base_run=not resuming)
  local.check(cfg)
  kd.check(cfg)
  if cfg.optim.estimator == "mezo" and cfg.model.param_dtype != "float32":
    raise ConfigError(
        f"optim.estimator = mezo with model.param_dtype = {cfg.model.param_dtype!r} is not "
        f"allowed: a perturbation of mezo_eps = {cfg.optim.mezo_eps} rounds away in "
        f"{cfg.model.param_dtype} weights of magnitude ~1 (norm scales), and so do MeZO's "
        f"small steps; keep float32 parameters (compute_dtype may be bfloat16)")
  mesh = make_mesh(cfg.parallel)
  seeds = split_seeds(tc.seed)
  _check_kernel_backend(cfg.model)
  loader, eval_loader, task_loader = _loaders(cfg, seeds.data_seed)
  data_size = shards(dict(RULES[cfg.parallel.strategy])[BATCH], dict(mesh.shape))
  # The mesh spans every host, so data_size already counts their devices: the batch must split
  # evenly over the data-parallel shards and over the hosts that load it, not their product.
  multiple = math.lcm(data_size, jax.process_count())
  if tc.batch_size % multiple:
    raise ConfigError(
        f"train.batch_size = {tc.batch_size} is not allowed: it must be a multiple of the "
        f"data-parallel size {data_size} (the mesh axes the batch is split over) and of the "
        f"{jax.process_count()} host(s), i.e. of {multiple}.")
  microbatch.check_split(tc, data_size)
  validate_for_model(cfg.parallel, cfg.model, mesh, batch_size=tc.batch_size,
                     seq_len=cfg.data.seq_len)
  return Setup(mesh, seeds, loader, eval_loader, task_loader)


def has_checkpoint(run_dir: pathlib.Path) -> bool:
  """Whether run_dir/checkpoints holds a step directory (complete or not: the restore decides,
  falling back past damaged ones)."""
  ckpt_dir = pathlib.Path(run_dir) / "checkpoints"
  return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def check_data(cfg: Config) -> str:
  """The data checks of `prepare` alone (files, lengths, task rows, vocabulary), without the
  mesh and backend ones: what a sweep checks for every entry before any of them trains, on a
  machine that may not be the one the entries run on. Returns the training data's hash (the
  bytes of its files included), as the run's provenance.json records it."""
  return _loaders(cfg, split_seeds(cfg.train.seed).data_seed)[0].data_hash


def stored_config_differences(run_dir: pathlib.Path, cfg: Config) -> str | None:
  """How the config.json a run directory holds differs from cfg: "" when alike, None when
  none is recorded (or unreadable)."""
  try:
    stored = json.loads((pathlib.Path(run_dir) / "config.json").read_text())
  except (OSError, ValueError):
    return None
  return describe_differences(stored, json.loads(json.dumps(to_dict(cfg), default=str)))


def _own_peak(before: int | None) -> int | None:
  """The device's peak bytes if this run raised it past `before` (the peak when it started),
  else None: a higher peak of an earlier computation in the process hides this run's."""
  peak = peak_device_bytes()
  return peak if peak is not None and (before is None or peak > before) else None


def eval_loaders(cfg: Config):
  """(eval loader, task-eval loader or None) of a run's config: the held-out rows its final
  evaluation (`final_eval_loss`, task accuracy) is measured on, train.eval_batches of them."""
  return _loaders(cfg, split_seeds(cfg.train.seed).data_seed)[1:]


def _loaders(cfg: Config, data_seed: int):
  """(train, eval, task-eval or None) loaders; raises UserError for data the run cannot use."""
  b = cfg.train.batch_size
  # (Not a DataConfig rule: configs derived from a run's, such as its task-only evaluation,
  # switch the source and keep the paths.)
  if cfg.data.paths and cfg.data.source not in ("text", "npy"):
    raise ConfigError(f"data.paths = {cfg.data.paths} is not allowed with data.source = "
                      f"{cfg.data.source!r}: files are read only by the 'text' and 'npy' "
                      "sources. Set data.source too, or leave data.paths empty.")
  check_training_mix(cfg.data, b)
  check_model(cfg.data, cfg.model)
  loader = make_loader(cfg.data, batch_size=b, seed=data_seed, split="train")
  eval_loader = make_loader(cfg.data, batch_size=b, seed=data_seed, split="eval")
  task_cfg = _task_eval_config(cfg)
  task_loader = None if task_cfg is None else make_loader(
      task_cfg, batch_size=b, seed=data_seed, split="eval")
  if cfg.model.vocab_size < loader.vocab_size:
    raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is not allowed: the data's "
                      f"tokenizer has {loader.vocab_size} tokens; use at least that.")
  return loader, eval_loader, task_loader


def _check_kernel_backend(model_cfg) -> None:
  """ConfigError for a GPU-only kernel chosen in the config on another backend: it would fail
  only when the step compiles, after the run directory was written."""
  mixers = set(model_cfg.mixers or ("attention",))
  if "attention" in mixers and model_cfg.attn_impl in ("pallas_gpu", "cudnn"):
    field, value = "model.attn_impl", model_cfg.attn_impl
  elif mixers & {"mamba2", "linear_attention"} and model_cfg.ssm.impl == "pallas_gpu":
    field, value = "model.ssm.impl", model_cfg.ssm.impl
  else:
    return
  if not gpu_backend():
    raise ConfigError(f"{field} = {value!r} is not allowed here: it runs only on an NVIDIA GPU, "
                      f"and this backend is {jax.default_backend()!r}. Use None (the best "
                      "implementation for the backend) or 'xla'.")


class _SigtermFlag:
  """Sets a flag on SIGTERM (main thread only); the loop saves and stops at the next step."""

  def __init__(self, enabled: bool):
    self.raised = False
    self._old = None
    self.enabled = enabled and threading.current_thread() is threading.main_thread()

  def __enter__(self):
    if self.enabled:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self.enabled:
      signal.signal(signal.SIGTERM, self._old)


def train(cfg: Config, run_dir: pathlib.Path | None = None, *, resume: bool = False,
          stop_at_step: int | None = None, progress: bool = True, name: str = "run",
          setup: Setup | None = None, on_start: Callable[[], None] | None = None) -> dict:
  """Trains `cfg` (writing metrics/checkpoints under run_dir when given); returns the summary.

  resume: continue from the newest complete checkpoint in run_dir/checkpoints, if any.
  stop_at_step: stop (and checkpoint) after this many steps, keeping the schedule of
    train.steps: "train k, stop, resume, train N-k" equals "train N" bit for bit.
  on_start: called once training is accepted (a resume's checkpoint restored and checked, work
    left to do), before anything is compiled: where the runner writes the run's config and
    provenance, so that a refused or finished resume leaves them as they were.
  """
  t_start = time.perf_counter()
  # The allocator's peak cannot be reset: an earlier computation of this process (a pipeline's
  # previous run) may hold it. Only a peak this run raises is this run's.
  peak_before = peak_device_bytes()
  tc = cfg.train
  end = tc.steps if stop_at_step is None else min(stop_at_step, tc.steps)
  run_dir = None if run_dir is None else pathlib.Path(run_dir)
  restoring = bool(resume and run_dir is not None and cfg.checkpoint.enabled
                   and has_checkpoint(run_dir))
  setup = setup or prepare(cfg, resuming=restoring)
  loader, bsh = setup.loader, batch_sharding(setup.mesh, cfg.parallel.strategy)
  # Mesh, logical rules and sequence-parallel options for every trace of the step.
  context = functools.partial(sharding_context, setup.mesh, cfg.parallel.strategy,
                              sequence_method=cfg.parallel.sequence_method,
                              sequence_layout=cfg.parallel.layout)

  # Restoring: the checkpoint holds the whole model, so a fine-tune's base is not read again.
  ts = init_state(cfg, setup.seeds.model_key, load_base=not restoring)
  shardings = state_shardings(ts.state, setup.mesh, cfg.parallel.strategy)
  state = jax.device_put(ts.state, shardings)

  ckpt = None
  if run_dir is not None and cfg.checkpoint.enabled:
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
  elif resume and run_dir is not None and any(
      p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")):
    raise ConfigError("--resume with checkpoint.enabled = false: this run has checkpoints, but "
                      "with checkpointing off none is restored and training would start over "
                      "beside them. Set checkpoint.enabled = true to continue, or use "
                      "--overwrite to start again.")
  identity = run_identity(cfg)
  start = 0
  if restoring and ckpt is not None and ckpt.latest_step() is None and cfg.finetune.base:
    # step directories, but none complete: the run starts over, from its base
    finetune.check(cfg)
    ts = init_state(cfg, setup.seeds.model_key)
    state = jax.device_put(ts.state, shardings)
  if resume and ckpt is not None and ckpt.latest_step() is not None:
    state, data_state, _ = ckpt.restore(state, expect_meta={"run": identity})
    loader.restore(data_state)
    start = int(data_state["step"])
    if start > end:  # nothing to run, and a final save would relabel the state as step `end`
      ckpt.close()
      raise ConfigError(
          f"train.steps = {tc.steps}" + (f" (stop_at_step = {stop_at_step})" if stop_at_step
                                         is not None else "")
          + f" is not allowed: the checkpoint this run resumes from is at step {start}. "
          "Train to at least that step, or start a new run.")
  if ckpt is not None:
    # A crash's leftovers (unfinished or corrupt steps) would collide with new saves.
    ckpt.discard(after=start)
  if run_dir is not None:
    if start >= end and (run_dir / "summary.json").exists():  # finished earlier
      if ckpt is not None:
        ckpt.close()
      diffs = stored_config_differences(run_dir, cfg)
      if diffs:
        raise ConfigError(
            f"run {str(run_dir)!r} finished earlier with another config ({diffs}), so its "
            "results are not this config's, and nothing is left to train. Pass --overwrite to "
            "train it again with this config, or choose another --name.")
      return json.loads((run_dir / "summary.json").read_text())
    if jax.process_index() == 0:  # process 0 alone owns the run directory's files
      (run_dir / "summary.json").unlink(missing_ok=True)  # in progress: no stale summary
      truncate_after(run_dir / "metrics.jsonl", start)
  if on_start is not None:
    on_start()
  # TensorBoard drops what an abandoned attempt logged after `start`, as metrics.jsonl did.
  writer = MetricsWriter(run_dir if jax.process_index() == 0 else None, purge_after=start)
  # What the summary averages over the last steps, and the last eval, carried across a resume:
  # "train k, stop, resume, train N-k" then summarises as "train N" does.
  recent_losses, eval_metrics = (
      resumed_history(run_dir / "metrics.jsonl", start)
      if run_dir is not None and start and jax.process_index() == 0 else ([], {}))
  meta = {"run": identity, "config": to_dict(cfg)}

  failed_alone = False
  try:
    # Compile once ahead of time: the executables are what runs, and they report memory.
    example = loader.global_batch(start, bsh)
    # teacher.run: the frozen teacher's model, an argument of the step of its own (memx.train.kd)
    teacher = kd.load_teacher(cfg, setup.mesh)
    t_graphdef, t_args = (None, ()) if teacher is None else (teacher[0], (teacher[1],))
    with context():
      step_fn = jax.jit(make_train_step(cfg, ts.graphdef, t_graphdef), donate_argnums=0,
                        out_shardings=(shardings, None)).lower(state, example, *t_args).compile()
      if teacher is not None:
        step_fn = kd.WithTeacher(step_fn, teacher[1])
      eval_fn = jax.jit(make_eval_step(ts.graphdef, tc.microbatches)).lower(
          state, example).compile()
      # A mid-run checkpoint runs the step split in two (gradients, then the update that
      # donates the state) so the snapshot can overlap the gradients: compile that pair now
      # too, not at the first save, where its compile time would stall the run (and count as
      # step time: session 9's GPU checkpoint bench paid it inside every mode's mean step).
      every = cfg.checkpoint.every
      saves_mid_run = ckpt is not None and (start // every + 1) * every < end
      # A run resumed from a scheduled save runs its first step split too, as the run that
      # went on past that save did: the two programs may round the update differently from
      # the fused one (XLA:CPU on some hosts), and resuming is promised to be bit-exact.
      split_first = ckpt is not None and 0 < start < end and start % every == 0
      split_fns = (_compile_split(cfg, ts.graphdef, shardings, state, example, teacher)
                   if saves_mid_run or split_first else None)
    memory = compiled_memory(step_fn)

    bar = tqdm(total=end, initial=start, desc=name, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0, leave=True)
    pending: list[tuple[int, dict]] = []
    rates = []
    clock = {"t": time.perf_counter(), "steps": 0}
    timed = {"s": 0.0, "steps": 0}  # the intervals behind `rates`: their mean step time
    tokens_per_step = tc.batch_size * cfg.data.seq_len

    def flush():
      if not pending:
        return
      host = jax.device_get([m for _, m in pending])
      now = time.perf_counter()
      rate = clock["steps"] * tokens_per_step / max(now - clock["t"], 1e-9)
      for (step, _), m in zip(pending, host, strict=True):
        loss = float(m["loss"])
        record = {"step": step, "split": "train", "loss": loss,
                  "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])}
        # local learning's auxiliary losses, one per group but the last
        record.update({f"local_loss_{g}": float(v) for g, v in enumerate(m.get("local_loss", []))})
        if "kd_divergence" in m:  # teacher.run: the divergence from the teacher (memx.train.kd)
          record["kd_divergence"] = float(m["kd_divergence"])
        if step == pending[-1][0]:
          record["tokens_per_s"] = rate
        writer.write(record)
        if not math.isfinite(loss):
          raise NonFiniteLossError(step, loss)
        recent_losses.append(loss)
      if pending[0][0] > start + 1 or len(pending) == end - start:
        rates.append(rate)  # the first interval after compile includes warm-up: skip it
        timed["s"] += now - clock["t"]
        timed["steps"] += clock["steps"]
      del recent_losses[:-max(10, tc.log_every)]
      bar.update(len(pending))
      bar.set_postfix(loss=f"{recent_losses[-1]:.4f}")
      pending.clear()
      clock["t"], clock["steps"] = now, 0

    def final_save(step):
      """Checks state `step` with a loss on the next batch, then saves it synchronously."""
      flush()
      snap = ckpt.begin(state)
      out = jax.device_get(eval_fn(state, loader.global_batch(step, bsh)))
      loss = float(out["loss_sum"]) / max(float(out["weight"]), 1.0)
      if not math.isfinite(loss):
        raise NonFiniteLossError(step + 1, loss)
      ckpt.save(step, snap, {"step": step}, meta)
      ckpt.wait()

    save_after: int | None = None  # a step whose state is saved during the next step
    # Several processes must stop at one step, or they run mismatched collectives: there JAX's
    # preemption service (on with jax.distributed) hears SIGTERM on any host and names a step
    # all reach. A Python handler would replace its signal handler, so ours serves one process.
    on_sigterm = cfg.checkpoint.save_on_sigterm and ckpt is not None
    agreed = on_sigterm and jax.process_count() > 1
    with _SigtermFlag(on_sigterm and not agreed) as sigterm:
      for step in range(start, end):
        batch = example if step == start else loader.global_batch(step, bsh)
        if split_first and step == start:  # (its checkpoint exists: nothing to save)
          grad_fn, apply_fn = split_fns
          grads, metrics = grad_fn(state, batch)
          state = apply_fn(state, grads)
          pending.append((step + 1, metrics))
          clock["steps"] += 1
        elif save_after is not None:
          grad_fn, apply_fn = split_fns
          snap = ckpt.begin(state)                       # lazy: copies start now
          grads, metrics = grad_fn(state, batch)         # reads state `save_after` only
          pending.append((step + 1, metrics))
          clock["steps"] += 1
          flush()                                        # loss from that state is finite
          ckpt.save(save_after, snap, {"step": save_after}, meta)
          state = apply_fn(state, grads)                 # donation: after the copy is done
          save_after = None
        else:
          state, metrics = step_fn(state, batch)
          pending.append((step + 1, metrics))
          clock["steps"] += 1
        done = step + 1
        # At train.steps, not at stop_at_step: a stopped run logs what the straight run does.
        eval_due = done == tc.steps or (tc.eval_every and done % tc.eval_every == 0)
        if done % tc.log_every == 0 or eval_due:
          flush()
        if ckpt is not None:
          ckpt.poll()
        if eval_due:
          eval_metrics = _evaluate(eval_fn, state, setup.eval_loader, setup.task_loader,
                                   tc.eval_batches, bsh)
          writer.write({"step": done, "split": "eval", **eval_metrics})
          clock["t"] = time.perf_counter()  # keep eval time out of the throughput
        # At the last step the final save and the summary below are the way out: a preemption
        # there would leave a resume nothing to run and nothing to summarise.
        if done < end and (sigterm.raised or (
            agreed and multihost_utils.reached_preemption_sync_point(done))):
          final_save(done)
          raise Preempted(done)
        if ckpt is not None and done % cfg.checkpoint.every == 0 and done < end:
          save_after = done
      flush()
      if ckpt is not None and not (start == end and ckpt.latest_step() == end):
        final_save(end)  # (a resume at `end` itself has that checkpoint complete already)
    bar.close()

    summary = {
        "name": name,
        "status": "done" if end == tc.steps else "stopped",
        "steps": end,
        "params": finetune.param_count(nnx.merge(ts.graphdef, ts.state)[0]),
        # what trains: every parameter, or a fine-tune's adapters (memx.train.finetune)
        "trainable_params": trainable_params(ts.state, cfg),
        "final_train_loss": statistics.fmean(recent_losses[-10:]) if recent_losses else None,
        "final_eval_loss": eval_metrics.get("loss"),
        "eval_perplexity": eval_metrics.get("perplexity"),
        "task_accuracy": eval_metrics.get("accuracy"),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "step_time_s": (tokens_per_step / statistics.median(rates)) if rates else None,
        # Mean over the same intervals: unlike the median it includes the steps that save a
        # checkpoint (or evaluate), so it is the cost a run pays.
        "step_time_mean_s": timed["s"] / timed["steps"] if timed["steps"] else None,
        "memory": {**memory, "peak_bytes": _own_peak(peak_before)},
        "param_bytes": tree_bytes(ts.state[0]),
        "opt_state_bytes": tree_bytes(ts.state) - tree_bytes(ts.state[0]),
        "checkpoint_bytes": None if ckpt is None else ckpt.size_bytes(),
        "checkpoint_mode": None if ckpt is None else cfg.checkpoint.mode,
        "checkpoint_blocking_s": (statistics.median(ckpt.blocking_s)
                                  if ckpt is not None and ckpt.blocking_s else None),
        "checkpoint_write_wait_s": (statistics.median(ckpt.write_wait_s)
                                    if ckpt is not None and ckpt.write_wait_s else None),
        "wall_s": time.perf_counter() - t_start,
    }
    if run_dir is not None and jax.process_index() == 0:
      write_json(run_dir / "summary.json", summary)
    return summary
  except (Preempted, NonFiniteLossError):
    raise  # every process leaves at the same step (an agreed stop, a global loss): collective
  except BaseException:
    # An error of this process alone (a full disk, a closed output pipe): the others may be
    # inside a training step, so closing must not wait for them in a collective.
    failed_alone = True
    raise
  finally:
    writer.close()
    if ckpt is not None:
      ckpt.close(after_error=failed_alone)


def _compile_split(cfg, graphdef, shardings, state, batch, teacher=None):
  """The step as two programs (gradients, then the update), for steps that save mid-run.

  The gradients are laid out as their parameters (under FSDP: sharded, as in the fused step),
  and the update is compiled for exactly that layout: left to XLA, the gradient program
  returned some of them replicated while the update expected them sharded (a sharding
  mismatch at the first save)."""
  t_graphdef, t_args = (None, ()) if teacher is None else (teacher[0], (teacher[1],))
  grad_step = make_grad_step(cfg, graphdef, t_graphdef)
  mesh = jax.tree.leaves(shardings)[0].mesh
  abstract = jax.eval_shape(grad_step, state, batch, *t_args)[0]
  grad_shardings = state_shardings(abstract, mesh, cfg.parallel.strategy)
  grad_fn = jax.jit(grad_step, out_shardings=(grad_shardings, None)).lower(
      state, batch, *t_args).compile()
  grads_shape = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                             abstract, grad_fn.output_shardings[0])
  if teacher is not None:
    grad_fn = kd.WithTeacher(grad_fn, teacher[1])
  apply_fn = jax.jit(make_apply_step(cfg, graphdef), donate_argnums=0,
                     out_shardings=shardings).lower(state, grads_shape).compile()
  return grad_fn, apply_fn


def trainable_params(state, cfg: Config) -> int:
  """Entries of the model's variables that the run trains (finetune.lora_rank's adapters, or
  every parameter)."""
  kind = finetune.trainable(cfg)
  return int(sum(v.get_value().size for v in jax.tree.leaves(
      state[0], is_leaf=lambda x: isinstance(x, nnx.Variable)) if isinstance(v, kind)))


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


