"""Train state creation and the jit'd train / eval steps (functional: graphdef + state)."""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memx.config import Config
from memx.nn.quantized import Quantized
from memx.parallel.axes import EMBED
from memx.parallel.rules import FSDP, RULES, mesh_axes_of
from memx.parallel.sequence import batch_to_layout
from memx.train import kd, local, mezo, microbatch
from memx.train.finetune import build_model, trainable
from memx.train.loss import (
  answer_hits,
  lm_token_losses,
  token_losses,
  weight_total,
  weighted_mean,
)
from memx.train.optim import lr_schedule, make_optimizer

Batch = dict[str, jax.Array]
# MeZO's directions come from their own stream of the run's seed (not the model's or data's).
MEZO_STREAM = 0x6D657A6F
# On-policy distillation samples from its own stream too (memx.train.kd).
KD_STREAM = 0x4B44


@dataclasses.dataclass(frozen=True)
class TrainState:
  """graphdef is static structure; state holds every array (params, optimizer moments, step)."""

  graphdef: Any
  state: Any


def init_state(cfg: Config, model_key: jax.Array, *, load_base: bool = True) -> TrainState:
  """The model (initialized, or finetune.base's weights, adapted per finetune.*) and its
  optimizer over the trainable variables (memx.train.finetune). load_base=False skips reading
  the base run (a state about to be restored from a checkpoint)."""
  graphdef, state = nnx.split(_model_and_opt(cfg, build_model(cfg, model_key,
                                                              load_base=load_base)))
  return TrainState(graphdef, state)


def abstract_state(cfg: Config, model_key: jax.Array) -> TrainState:
  """Shapes and dtypes of the train state without allocating it (or reading a base run)."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: _model_and_opt(cfg, build_model(cfg, model_key, load_base=False))))
  return TrainState(graphdef, state)


def _model_and_opt(cfg, model):
  opt = make_optimizer(cfg.optim, cfg.train.steps, cfg.train.seed)
  return model, nnx.Optimizer(model, opt, wrt=trainable(cfg))


def _spec(axes: tuple[str, ...] | None, rules) -> PartitionSpec:
  if axes is None:
    return PartitionSpec()
  table = dict(rules)
  return PartitionSpec(*(table.get(a) for a in axes))


def state_shardings(state, mesh: Mesh, strategy: str):
  """NamedSharding per array: logical `axes` metadata through the strategy's rule table.

  Optimizer state inherits its parameter's `axes` whatever its shape. A moment shaped as its
  parameter (AdamW's, Lion's) is sharded as the parameter. A statistic of another shape
  (Adafactor's factored rows and columns, GaLore's projections, low-rank moments) keeps an
  axis only on the dims it shares with a parameter of those axes (APOLLO's [r, heads, k]
  moment of wq keeps heads). Under FSDP such a statistic usually lost the EMBED dim (the side
  low-rank optimizers project), so it is split over the "fsdp" mesh axis along its largest dim
  that divides evenly, as ZeRO splits any optimizer state; without one it is replicated.
  LoRA adapters whose axes FSDP does not split (B [r, heads, k] has no EMBED dim) are split the
  same way, with their moments; quantized bases (memx.nn.quantized) as their weights, on the
  dims the mesh divides."""
  rules = RULES[strategy]
  table = dict(rules)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  param_shapes: dict[tuple, set] = {}
  adapters = set()  # (axes, shape) of LoRA adapters: they and their moments may split over fsdp
  for v in jax.tree.leaves(state, is_leaf=is_var):
    if isinstance(v, nnx.Param) and _axes(v) is not None:
      param_shapes.setdefault(_axes(v), set()).add(tuple(v.shape))
      if isinstance(v, nnx.LoRAParam):
        adapters.add((_axes(v), tuple(v.shape)))
  fsdp = FSDP if FSDP in mesh.shape and FSDP in mesh_axes_of(table.get(EMBED)) else None

  def over_fsdp(entries, shape):
    """entries with "fsdp" on the largest free dim it divides, when no entry uses it yet."""
    used = {m for e in entries for m in mesh_axes_of(e)}
    if fsdp is not None and fsdp not in used and mesh.shape[fsdp] > 1:
      free = [i for i, e in enumerate(entries) if e is None and shape[i] % mesh.shape[fsdp] == 0]
      if free:
        entries[max(free, key=lambda i: (shape[i], -i))] = fsdp
    return entries

  def one(var):
    axes = _axes(var) if is_var(var) else None
    shape = tuple(var.shape) if is_var(var) else ()
    if isinstance(var, Quantized) and axes is not None:  # split as its weight, where it divides
      spec = _spec(axes, rules)
      return NamedSharding(mesh, PartitionSpec(*(
          e if e is None or n % math.prod(mesh.shape[a] for a in mesh_axes_of(e)) == 0 else None
          for e, n in zip(spec, shape, strict=True))))
    if axes is not None and (axes, shape) in adapters:
      return NamedSharding(mesh, PartitionSpec(*over_fsdp(list(_spec(axes, rules)), shape)))
    if axes is None or isinstance(var, nnx.Param) or shape in param_shapes.get(axes, ()):
      return NamedSharding(mesh, _spec(axes, rules))
    same_rank = [p for p in param_shapes.get(axes, ()) if len(p) == len(shape)]
    entries = [None] * len(shape)
    if same_rank:  # then axes has one name per dim
      entries = [table.get(a) if any(p[i] == n for p in same_rank) else None
                 for i, (a, n) in enumerate(zip(axes, shape, strict=True))]
    return NamedSharding(mesh, PartitionSpec(*over_fsdp(entries, shape)))

  return jax.tree.map(one, state, is_leaf=is_var)


def _axes(var) -> tuple | None:
  axes = var.get_metadata().get("axes")
  return None if axes is None else tuple(axes)


def fsdp_device_bytes(state, devices: int = 8) -> int:
  """Bytes of `state` (a train state or a part of one) that one device holds under
  `devices`-way FSDP: each array's shard shape under `state_shardings`, on an abstract mesh
  (nothing is allocated)."""
  from jax.sharding import AbstractMesh

  mesh = AbstractMesh((1, devices), ("data", "fsdp"))
  shardings = jax.tree.leaves(state_shardings(state, mesh, "fsdp"))
  return int(sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, sh in zip(jax.tree.leaves(state), shardings, strict=True)))


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_grad_step(cfg: Config, graphdef, teacher_graphdef=None):
  """(state, batch[, teacher state]) → (grads, metrics): reads the state, never mutates it.
  With train.microbatches = n > 1 the batch runs in n pieces whose gradients add up to the full
  batch's (memx.train.microbatch). With teacher.run, the loss adds the divergence from the
  teacher's predictions (memx.train.kd; teacher_graphdef and the step's teacher state are the
  restored teacher's); "loss" stays the cross-entropy and "kd_divergence" is logged beside it."""
  schedule = lr_schedule(cfg.optim, cfg.train.steps)
  kd_cfg = cfg.teacher

  def grad_step(state, batch: Batch, teacher_state=None):
    model, opt = nnx.merge(graphdef, state)

    # Under sequence parallelism the tokens arrive in the ring's layout (positions say where).
    b, positions = batch_to_layout(batch)
    b = {**b, "positions": positions}
    if kd_cfg.on_policy > 0:  # some rows continue with the model's own samples (GKD)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), KD_STREAM),
                               opt.step[...])
      b = kd.on_policy_batch(model, b, kd_cfg.on_policy, kd_cfg.prompt_len,
                             kd_cfg.sample_temperature, key)
    # The batch's weighted mean, as a sum over rows with a denominator fixed up front, so the
    # microbatches' terms add up to it.
    total = weight_total(b["weights"])
    kd_total = weight_total(b["kd_weights"]) if "kd_weights" in b else total

    def loss_fn(model, mb):
      losses = lm_token_losses(model, mb["inputs"], mb["targets"], positions=mb["positions"],
                               segment_ids=mb.get("segment_ids"),
                               vocab_block=cfg.train.loss_vocab_block)
      return weighted_mean(losses, mb["weights"], total)

    def kd_loss_fn(model, mb):
      kw = {"positions": mb["positions"], "segment_ids": mb.get("segment_ids")}
      logits = model(mb["inputs"], **kw)
      teacher = nnx.merge(teacher_graphdef, teacher_state)
      target = jax.lax.stop_gradient(teacher(mb["inputs"], **kw))
      ce = weighted_mean(token_losses(logits, mb["targets"]), mb["weights"], total)
      div = weighted_mean(kd.divergence(logits, target, kd_cfg.divergence, kd_cfg.temperature),
                          mb.get("kd_weights", mb["weights"]), kd_total)
      return (1 - kd_cfg.weight) * ce + kd_cfg.weight * div, {"ce": ce, "kd_divergence": div}

    extra = {}
    if cfg.optim.estimator == "mezo":
      loss, grads = _mezo_estimate(cfg, model, opt, loss_fn, b)
    elif cfg.local.groups > 1:
      (loss, extra), grads = microbatch.accumulate_model(
          lambda m, mb: local.value_and_grad(cfg, m, mb, total, trainable(cfg)), model, b,
          cfg.train.microbatches, wrt=trainable(cfg))
    elif kd_cfg.run is not None:
      (_, parts), grads = microbatch.value_and_grad(kd_loss_fn, model, b, cfg.train.microbatches,
                                                    wrt=trainable(cfg), has_aux=True)
      loss, extra = parts["ce"], {"kd_divergence": parts["kd_divergence"]}
    else:
      loss, grads = microbatch.value_and_grad(loss_fn, model, b, cfg.train.microbatches,
                                              wrt=trainable(cfg))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(opt.step[...]),
               **extra}
    return grads, metrics

  return grad_step


def _mezo_estimate(cfg: Config, model, opt, loss_fn, batch: Batch):
  """(the mean of the ±ε losses, MeZO's gradient estimate over the trainable variables): two
  forward passes (each in the step's microbatches), z drawn from (train.seed, step)."""
  gd, params, rest = nnx.split(model, trainable(cfg), ...)

  def loss_of(p):
    def sums(p, mb):
      return {"loss": loss_fn(nnx.merge(gd, p, rest), mb)}
    return microbatch.sum_over(sums, p, batch, cfg.train.microbatches)["loss"]

  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), MEZO_STREAM),
                           opt.step[...])
  _, loss, grads = mezo.spsa(loss_of, params, key, cfg.optim.mezo_eps, cfg.optim.mezo_sparsity)
  return loss, grads


def make_apply_step(cfg: Config, graphdef):
  """(state, grads) → state after one optimizer update (the only mutation of the state), and
  with local.aux_weights "ema", MAN's moving averages of the updated layers."""
  ema = cfg.local.groups > 1 and cfg.local.aux_weights == "ema"

  def apply_step(state, grads):
    model, opt = nnx.merge(graphdef, state)
    opt.update(model, grads)
    if ema:
      local.update_ema(model, cfg.local.ema_decay)
    return nnx.state((model, opt))

  return apply_step


def make_train_step(cfg: Config, graphdef, teacher_graphdef=None):
  """The fused step: grad_step then apply_step in one program (bit-identical to the split)."""
  grad_step = make_grad_step(cfg, graphdef, teacher_graphdef)
  apply_step = make_apply_step(cfg, graphdef)

  def train_step(state, batch: Batch, teacher_state=None):
    grads, metrics = grad_step(state, batch, teacher_state)
    return apply_step(state, grads), metrics

  return train_step


def make_eval_step(graphdef, microbatches: int = 1):
  """(state, batch) → sums of token losses, weights and answer hits; in `microbatches` pieces
  (the training step's), so evaluation needs no more activation memory than training."""

  def eval_step(state, batch: Batch):
    b, positions = batch_to_layout(batch)

    def sums(state, mb):
      model, _ = nnx.merge(graphdef, state)
      logits = model(mb["inputs"], positions=mb["positions"], segment_ids=mb.get("segment_ids"))
      losses = token_losses(logits, mb["targets"])
      correct, answers = answer_hits(logits, mb["targets"], mb["answer_mask"])
      return {"loss_sum": jnp.sum(losses * mb["weights"]), "weight": jnp.sum(mb["weights"]),
              "correct": correct, "answers": answers}

    return microbatch.sum_over(sums, state, {**b, "positions": positions}, microbatches)

  return eval_step
