"""The three-stage recipe: trainable masks, the jit'd distillation step, and one stage's run.

A stage trains the student (teacher frozen: its arrays enter the step as a separate argument,
its forward runs under `jax.lax.stop_gradient` outside the differentiated function, and it is
never checkpointed). The optimizer and the gradient cover exactly the stage's trainable
parameters (`trainable_filter`, passed as nnx.Optimizer's `wrt` and as the `DiffState` of the
gradient), so every other parameter is bit-identical after any number of steps.

Directory of one stage (`run_stage`):
  config.json      the student as a memx Config (model = student, optim/train = this stage)
  stage.json       the stage's settings, its starting point and the teacher
  metrics.jsonl    each loss term, top-1 agreement with the teacher, grad norm, lr; the final
                   evaluation (split "eval")
  state/           resumable checkpoints: the student and the optimizer state of its trainable
                   parameters (never the teacher), every stage.checkpoint_every steps
  checkpoints/     written once the stage ends: the final student in `memx run`'s layout
                   (model + a fresh optimizer over all parameters), so
                   `memx.train.restore.load_trained(stage_dir)` and everything built on it
                   (evaluation, generation, the next stage) load it as a normal run
  summary.json     final metrics; its presence marks the stage finished
"""

import dataclasses
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from memx._io import write_json
from memx.checkpoint import Checkpointer
from memx.config import Config, OptimConfig, TrainConfig, to_dict
from memx.data.documents import model_kwargs
from memx.distill.capture import teacher_pass
from memx.distill.config import DistillConfig, StageConfig
from memx.distill.losses import kl_divergence, layer_mse, top1_agreement
from memx.distill.seed import NEW_PARAMS
from memx.errors import NonFiniteLossError
from memx.models.transformer import TransformerLM
from memx.train import microbatch
from memx.train.loss import answer_hits, token_losses, weight_total, weighted_mean
from memx.train.memory import compiled_memory
from memx.train.metrics import MetricsWriter, truncate_after
from memx.train.optim import lr_schedule, make_optimizer


def trainable_filter(mode: str, layers: tuple[int, ...]):
  """nnx filter (path, variable) → bool selecting the parameters a stage trains.

  "new": the SSM parameters seeding creates (seed.NEW_PARAMS) in converted layers; "mixer_in":
  the converted mixers minus w_out; "mixer": the whole converted mixers; "all": every Param.
  """
  layer_set = frozenset(layers)

  def in_mixer(path) -> bool:
    return (len(path) >= 4 and path[0] == "blocks" and path[1] in layer_set
            and path[2] == "mixer")

  def pick(path, var) -> bool:
    if not isinstance(var, nnx.Param):
      return False
    if mode == "all":
      return True
    if not in_mixer(path):
      return False
    name = path[3]
    if mode == "new":
      return name in NEW_PARAMS
    if mode == "mixer_in":
      return name != "w_out"
    return True  # "mixer"

  return pick


def stage_optim(stage: StageConfig) -> OptimConfig:
  return OptimConfig(lr=stage.lr, min_lr_ratio=stage.min_lr_ratio,
                     warmup_steps=stage.warmup_steps, weight_decay=stage.weight_decay,
                     clip_norm=stage.clip_norm)


def stage_run_config(student_model, data, stage: StageConfig, dcfg: DistillConfig) -> Config:
  """The stage directory's config.json: a memx Config whose model is the student."""
  return Config(model=student_model, data=data, optim=stage_optim(stage),
                train=TrainConfig(steps=stage.steps, batch_size=stage.batch_size, seed=dcfg.seed,
                                  log_every=stage.log_every, eval_batches=dcfg.eval_batches,
                                  microbatches=stage.microbatches),
                checkpoint=dataclasses.replace(dcfg.checkpoint, every=stage.checkpoint_every))


# --- the step ---------------------------------------------------------------------------------


def _stage_losses(stage: StageConfig, student: TransformerLM, batch, layers, teacher_out, *,
                  parts: int = 1, total=None):
  """(loss, terms) of the student against precomputed (stop-gradient) teacher outputs.

  On a microbatch (`parts` equal slices of a batch whose weights sum to `total`), each
  value is this slice's share, so the shares add up to the whole batch's: the means (MSE, KL,
  agreement) divided by `parts`, the weighted cross-entropy over the batch's total weight."""
  t_logits, t_inputs, t_outputs = teacher_out
  if stage.loss == "layer_mse":
    outs = {i: student.blocks[i].mixer(t_inputs[i], batch.get("segment_ids")) for i in layers}
    mse = layer_mse(outs, t_outputs) / parts
    return stage.mse_scale * mse, {"mse": mse}
  logits = student(batch["inputs"], **model_kwargs(batch))
  kl = kl_divergence(t_logits, logits, stage.temperature) / parts
  ce = weighted_mean(token_losses(logits, batch["targets"]), batch["weights"], total)
  loss = stage.kl_weight * kl + stage.ce_weight * ce
  terms = {"kl": kl, "ce": ce, "agreement": top1_agreement(t_logits, logits) / parts}
  if stage.temperature != 1.0:  # "kl" is always plain KL (τ = 1), as in the evaluations
    terms["kl_tau"] = kl
    terms["kl"] = jax.lax.stop_gradient(kl_divergence(t_logits, logits)) / parts
  return loss, terms


def make_step(stage: StageConfig, graphdef, teacher_graphdef, layers: tuple[int, ...],
              filt):
  """(state, teacher_state, batch) → (state, metrics): one update of the trainable params,
  from stage.microbatches pieces of the batch (memx.train.microbatch)."""
  schedule = lr_schedule(stage_optim(stage), stage.steps)
  n = stage.microbatches

  def step(state, teacher_state, batch):
    student, opt = nnx.merge(graphdef, state)
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    total = weight_total(batch["weights"])

    def loss_fn(model, mb):
      # The teacher runs behind stop_gradient and is no argument of the differentiated
      # function: no gradient ever reaches it, and its arrays are an input of the step, never
      # updated. It runs per microbatch, so its activations are one microbatch's too.
      teacher_out = jax.lax.stop_gradient(
          teacher_pass(teacher, mb["inputs"], layers, **model_kwargs(mb)))
      return _stage_losses(stage, model, mb, layers, teacher_out, parts=n, total=total)

    (loss, terms), grads = microbatch.value_and_grad(loss_fn, student, batch, n, wrt=filt,
                                                     has_aux=True)
    metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads),
               "lr": schedule(opt.step[...])}
    opt.update(student, grads)
    return nnx.state((student, opt)), metrics

  return step


def end_to_end_metrics(t_logits, s_logits, batch, parts: int = 1, total=None) -> dict:
  """Student vs teacher logits on a batch: means (KL, agreement), token-weighted means (ce,
  teacher_ce) and counts. On a microbatch (`parts` equal slices of a batch whose weights sum
  to `total`) each value is the slice's share of the whole batch's (see
  `_stage_losses`)."""
  correct, answers = answer_hits(s_logits, batch["targets"], batch["answer_mask"])
  t_correct, _ = answer_hits(t_logits, batch["targets"], batch["answer_mask"])
  def ce(logits):
    return weighted_mean(token_losses(logits, batch["targets"]), batch["weights"], total)

  return {"kl": kl_divergence(t_logits, s_logits) / parts, "ce": ce(s_logits),
          "teacher_ce": ce(t_logits), "agreement": top1_agreement(t_logits, s_logits) / parts,
          "correct": correct, "teacher_correct": t_correct, "answers": answers,
          "weight": jnp.sum(batch["weights"])}


# Compiler options of every distillation program; None = XLA's defaults. Tests set
# memx.kernels._testing.FAST_CPU_COMPILE (they need the numbers, not the speed).
COMPILER_OPTIONS: dict | None = None
_COMPARE_CACHE: dict = {}


def _signature(args) -> tuple:
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def compile_program(fn, args, *, donate_argnums=()):
  """fn compiled ahead of time for args (with COMPILER_OPTIONS): the executable that runs, and
  the one whose memory_analysis() the stage summary reports."""
  return jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile(
      compiler_options=COMPILER_OPTIONS)


def compare(s_graphdef, s_state, t_graphdef, t_state, batch, layers: tuple[int, ...],
            microbatches: int = 1) -> dict:
  """Student vs teacher on one batch, no update: end_to_end_metrics plus the layer-wise MSE
  ("mse") and the teacher outputs' mean square ("teacher_ms", so mse / teacher_ms is the
  relative error), in `microbatches` pieces (the stage's) whose shares add up to the batch's.
  Compiled once per model structure, shapes and pieces, shared by every stage."""
  # One device for every input, whatever mesh a restored model came from, so one executable
  # serves every caller (its input shardings are part of it).
  args = jax.device_put((s_state, t_state, batch),
                        jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  key = (s_graphdef, t_graphdef, tuple(layers), microbatches, _signature(args))
  if key not in _COMPARE_CACHE:
    def fn(s_state, t_state, batch):
      total = weight_total(batch["weights"])

      def one(states, mb):
        student = nnx.merge(s_graphdef, states[0])
        teacher = nnx.merge(t_graphdef, states[1])
        kw = model_kwargs(mb)
        t_logits, t_in, t_out = teacher_pass(teacher, mb["inputs"], layers, **kw)
        m = end_to_end_metrics(t_logits, student(mb["inputs"], **kw), mb, microbatches, total)
        if layers:  # models compared without converted layers (the teacher, a scratch model)
          seg = kw.get("segment_ids")
          outs = {i: student.blocks[i].mixer(t_in[i], seg) for i in layers}
          m["mse"] = layer_mse(outs, t_out) / microbatches
          m["teacher_ms"] = jnp.mean(
              jnp.stack([jnp.mean(jnp.square(t_out[i])) for i in layers])) / microbatches
        else:
          m["mse"] = m["teacher_ms"] = jnp.zeros((), jnp.float32)
        return m

      return microbatch.sum_over(one, (s_state, t_state), batch, microbatches)
    _COMPARE_CACHE[key] = compile_program(fn, args)
  return _COMPARE_CACHE[key](*args)


def to_device(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def params_finite(state) -> bool:
  """Whether every float array of the state is finite (checked on the host: no compile)."""
  return all(np.all(np.isfinite(x)) for x in jax.device_get(jax.tree.leaves(state))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# --- one stage --------------------------------------------------------------------------------


@dataclasses.dataclass
class StageRun:
  """What `run_stage` needs; built and checked by memx.distill.runner before anything runs."""

  index: int
  stage: StageConfig
  run_cfg: Config              # the stage directory's config.json
  directory: pathlib.Path
  layers: tuple[int, ...]      # converted layers
  identity: dict               # what a resumed checkpoint must share with this stage
  meta: dict                   # stage.json


def run_stage(run: StageRun, student: TransformerLM, teacher: TransformerLM, *, train_loader,
              eval_loaders, resume: bool, progress: bool = True) -> dict:
  """Trains `student` (modified in place) for one stage; returns the stage summary."""
  t0 = time.perf_counter()
  stage, cfg, out = run.stage, run.run_cfg, run.directory
  filt = trainable_filter(stage.trainable, run.layers)
  opt = nnx.Optimizer(student, make_optimizer(cfg.optim, stage.steps, cfg.train.seed), wrt=filt)
  # One device, one sharding for every input: a teacher restored by Orbax carries the named
  # sharding of its run's mesh, and mixed input shardings would recompile the step after its
  # first call (its outputs take the named one).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  graphdef, state = nnx.split((student, opt))
  state = jax.device_put(state, device)
  t_graphdef, t_state = nnx.split(teacher)
  t_state = jax.device_put(t_state, device)

  ckpt = Checkpointer(out / "state", cfg.checkpoint)
  meta = {"distill": run.identity}
  start = 0
  try:
    if resume and ckpt.latest_step() is not None:
      state, data_state, _ = ckpt.restore(state, expect_meta=meta)
      start = int(data_state["step"])
    ckpt.discard(after=start)
    truncate_after(out / "metrics.jsonl", start)
    step_fn = compile_program(make_step(stage, graphdef, t_graphdef, run.layers, filt),
                              (state, t_state, to_device(train_loader.local_batch(start))),
                              donate_argnums=0)
    memory = compiled_memory(step_fn)
    s_graphdef = nnx.graphdef(student)
    writer = MetricsWriter(out)
    bar = tqdm(total=stage.steps, initial=start, desc=f"stage {run.index}", unit="step",
               dynamic_ncols=True, disable=not progress, leave=True)
    recent = []
    try:
      for step in range(start, stage.steps):
        batch = to_device(train_loader.local_batch(step))
        probe = None
        done = step + 1
        log_now = done % stage.log_every == 0 or done == stage.steps or step == start
        if log_now and stage.loss == "layer_mse":
          # The end-to-end view of the student before this update (state[0]: the student).
          probe = compare(s_graphdef, state[0], t_graphdef, t_state, batch, run.layers,
                          stage.microbatches)
        state, metrics = step_fn(state, t_state, batch)
        if log_now:
          record = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if probe is not None:
            p = jax.device_get(probe)
            record.update(kl=float(p["kl"]), ce=float(p["ce"]), agreement=float(p["agreement"]),
                          mse_rel=float(p["mse"]) / max(float(p["teacher_ms"]), 1e-30))
          if not math.isfinite(record["loss"]):
            raise NonFiniteLossError(done, record["loss"])
          recent.append(record["loss"])
          writer.write({"step": done, "split": "train", **record})
          bar.set_postfix(loss=f"{record['loss']:.4g}")
        bar.update(1)
        if done % stage.checkpoint_every == 0 or done == stage.steps:
          if not params_finite(state):
            raise NonFiniteLossError(done, float("nan"))
          ckpt.save(done, state, {"step": done}, meta)
      bar.close()
      ckpt.wait()
      nnx.update((student, opt), state)
      evaluation = evaluate(student, teacher, eval_loaders, run.layers, stage.microbatches)
      writer.write({"step": stage.steps, "split": "eval", **evaluation})
    finally:
      writer.close()
  finally:
    ckpt.close()
  export(student, cfg, out)
  trained = sum(x.size for x in jax.tree.leaves(nnx.state(student, filt)))
  summary = {
      "name": f"stage{run.index}", "status": "done", "steps": stage.steps,
      "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param)))),
      "trainable_params": int(trained), "trainable": stage.trainable, "loss": stage.loss,
      "final_train_loss": float(np.mean(recent[-3:])) if recent else None,
      "final_eval_loss": evaluation.get("loss"),
      "eval_perplexity": evaluation.get("perplexity"),
      "task_accuracy": evaluation.get("accuracy"),
      **{k: v for k, v in evaluation.items() if k not in ("loss", "perplexity", "accuracy")},
      "memory": memory,
      "wall_s": time.perf_counter() - t0,
  }
  write_json(out / "summary.json", summary)
  return summary


def export(student: TransformerLM, cfg: Config, out: pathlib.Path) -> None:
  """The final student in `memx run`'s checkpoint layout (model + optimizer over all params;
  the optimizer half is fresh, as a fine-tuning run would start its own)."""
  opt = nnx.Optimizer(student, make_optimizer(cfg.optim, cfg.train.steps, cfg.train.seed),
                       wrt=nnx.Param)
  state = nnx.state((student, opt))
  shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a crash's half-written export
  ckpt = Checkpointer(out / "checkpoints", dataclasses.replace(cfg.checkpoint, mode="sync"))
  try:
    step = cfg.train.steps
    ckpt.save(step, state, {"step": step}, {"config": to_dict(cfg)})
    ckpt.wait()
  finally:
    ckpt.close()


def evaluate(student: TransformerLM, teacher: TransformerLM, loaders: dict, layers,
             microbatches: int = 1) -> dict:
  """Eval-split metrics of student vs teacher: student loss / perplexity, teacher loss, KL,
  top-1 agreement, layer-wise MSE (absolute and relative to the teacher outputs' mean square),
  and task accuracy of both (loaders: {"lm": L, "task": L or None, "batches": n})."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  s_graphdef, s_state = nnx.split(student)
  t_graphdef, t_state = nnx.split(teacher)
  s_state, t_state = jax.device_put((s_state, t_state), device)
  sums = ("correct", "teacher_correct", "answers", "weight")
  # Losses are token-weighted over all batches (sum of weighted losses / sum of weights), as
  # the train loop's evaluation: on a run's eval rows they reproduce its final_eval_loss.
  weighted = ("ce", "teacher_ce")

  def run(loader):
    rows = [jax.device_get(compare(s_graphdef, s_state, t_graphdef, t_state,
                                   to_device(loader.local_batch(i)), tuple(layers),
                                   microbatches))
            for i in range(loaders["batches"])]
    w = np.array([float(r["weight"]) for r in rows])
    out = {}
    for k in rows[0]:
      vals = np.array([float(r[k]) for r in rows])
      if k in sums:
        out[k] = float(vals.sum())
      elif k in weighted:
        out[k] = float((vals * np.maximum(w, 1.0)).sum() / max(w.sum(), 1.0))
      else:
        out[k] = float(vals.mean())
    return out

  lm = run(loaders["lm"])
  out = {"loss": lm["ce"], "perplexity": float(np.exp(min(lm["ce"], 80.0))),
         "teacher_loss": lm["teacher_ce"], "kl": lm["kl"], "agreement": lm["agreement"],
         "mse": lm["mse"], "mse_rel": lm["mse"] / max(lm["teacher_ms"], 1e-30)}
  task = run(loaders["task"]) if loaders.get("task") is not None else lm
  if task["answers"] > 0:
    out["accuracy"] = task["correct"] / task["answers"]
    out["teacher_accuracy"] = task["teacher_correct"] / task["answers"]
  return out


