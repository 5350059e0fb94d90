"""Supervised local learning: the blocks train in gradient-isolated groups (`LocalConfig`).

End-to-end backpropagation keeps every layer's activations until the backward pass comes back
down to it. Local learning cuts the L blocks into G contiguous groups and gives each its own
loss: group g's output goes, as a constant, to group g + 1, and through an auxiliary network
to a next-token loss that trains group g alone. No gradient crosses a group boundary, so a
group's backward pass runs right after its forward pass and its activations die there: what a
step keeps at its peak is one group's activations (plus its auxiliary network's), not all L
layers' (DGL, InfoPro; AugLocal and MAN below).

The auxiliary network of group g < G - 1 (the last group trains on the model's own loss):
- its blocks are built like layers sampled evenly from those after the group (AugLocal, Ma et
  al. 2024: the auxiliary net mimics the rest of the network, at a depth that falls linearly
  for deeper groups, since they have less left to mimic; `local.aux_decay`);
- `aux_weights = "own"` trains them as parameters of their own (AugLocal); "ema" makes them
  moving averages of the layers they copy plus a trained bias after each block (MAN, Su et al.
  2024), so they carry what the later layers learn without being trained themselves;
- then an RMSNorm of its own and the model's output projection, which every group's loss
  trains (one vocabulary matrix, however many groups).

The step computes exactly the gradient of Σ_g L_g with stop_gradient at every group boundary
(the test's oracle); the difference is the schedule. Each group's value_and_grad runs in turn,
and an optimization barrier hands the next group its input only together with this group's
gradients, so XLA cannot defer a group's backward pass (and keep its activations) past the
next group's forward pass.

The auxiliary networks live in the model (`model.local_aux`), so they are checkpointed,
restored and sharded with it; the model's forward pass, evaluation and generation never run
them, and `memx.train.finetune.param_count` leaves them out.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memx.config import Config
from memx.errors import ConfigError
from memx.models.transformer import Block, TransformerLM
from memx.nn.norms import RMSNorm
from memx.parallel.axes import EMBED
from memx.train.loss import feature_losses, weighted_mean

# The auxiliary networks' initialization draws from its own stream of the model key, so the
# model itself starts as a backpropagation run of the same seed does.
AUX_STREAM = 0x4C6F6361
AUX = "local_aux"  # the model attribute that holds the auxiliary networks


class EMAWeight(nnx.Variable):
  """A weight of a MAN auxiliary block: a moving average of the layer it copies, not trained."""


def group_layers(n_layers: int, groups: int) -> list[range]:
  """The layers of each group: contiguous, sizes differing by at most one, earlier groups
  larger."""
  q, r = divmod(n_layers, groups)
  starts = [g * q + min(g, r) for g in range(groups + 1)]
  return [range(starts[g], starts[g + 1]) for g in range(groups)]


def aux_layers(n_layers: int, local) -> list[tuple[int, ...]]:
  """For each group but the last, the model layers its auxiliary blocks are built like: its
  depth's worth, spread evenly over the layers after the group."""
  groups = group_layers(n_layers, local.groups)
  out = []
  for g, layers in enumerate(groups[:-1]):
    depth = local.aux_depth
    if local.aux_decay and local.groups > 2:
      depth = math.ceil(local.aux_depth * (local.groups - 1 - g) / (local.groups - 1))
    rest = n_layers - layers.stop
    out.append(tuple(layers.stop + k * rest // depth for k in range(depth)))
  return out


class LocalAux(nnx.Module):
  """Group g's auxiliary network: blocks like model layers `layers`, then an RMSNorm; the
  model's output projection follows (`value_and_grad`)."""

  def __init__(self, model_cfg, layers: tuple[int, ...], ema: bool, *, rngs: nnx.Rngs):
    self.layers = layers
    self.blocks = nnx.List([Block(model_cfg, j, rngs=rngs) for j in layers])
    if ema:
      for block in self.blocks:
        _make_ema(block)
      self.biases = nnx.Param(jnp.zeros((len(layers), model_cfg.d_model), jnp.float32),
                              axes=(None, EMBED))
    self.norm = RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps,
                        param_dtype=model_cfg.param_dtype)

  def __call__(self, model: TransformerLM, x, positions, segment_ids):
    bounds = model._layer_bounds()
    for k, (block, j) in enumerate(zip(self.blocks, self.layers, strict=True)):
      x = model._run_block(block, x, positions, segment_ids, bounds[j])
      if hasattr(self, "biases"):
        x = x + self.biases[k].astype(x.dtype)[None, None]
    return self.norm(x)


def _make_ema(module: nnx.Module) -> None:
  """Every nnx.Param inside `module` becomes an EMAWeight (same metadata), kept in float32: a
  decay of 0.99 moves a bfloat16 weight by less than its rounding step, and the average would
  stall."""
  for _, node in list(nnx.iter_graph(module)):
    if isinstance(node, nnx.Module):
      for name, v in list(vars(node).items()):
        if isinstance(v, nnx.Param):
          setattr(node, name, EMAWeight(v.get_value().astype(jnp.float32), **v.get_metadata()))


def check(cfg: Config) -> None:
  """ConfigError for local learning the rest of the config rules out (before any compute)."""
  local = cfg.local
  if local.groups == 1:
    return
  if local.groups > cfg.model.n_layers:
    raise ConfigError(f"local.groups = {local.groups} is not allowed: the model has "
                      f"model.n_layers = {cfg.model.n_layers} blocks to cut into groups, so at "
                      f"most {cfg.model.n_layers} groups")
  if cfg.optim.estimator != "backprop":
    raise ConfigError(f"local.groups = {local.groups} is not allowed with optim.estimator = "
                      f"{cfg.optim.estimator!r}: local learning splits backpropagation; "
                      "use optim.estimator = backprop")
  if cfg.finetune.lora_rank:
    raise ConfigError(f"local.groups = {local.groups} is not allowed with finetune.lora_rank = "
                      f"{cfg.finetune.lora_rank}: only the adapters would train, so the "
                      "auxiliary networks would stay at their initialization")


def add_aux(model: TransformerLM, cfg: Config, model_key: jax.Array) -> None:
  """Attaches the auxiliary networks (model.local_aux) for local.groups > 1. MAN's blocks
  start as the layers they average."""
  local = cfg.local
  if local.groups == 1:
    return
  rngs = nnx.Rngs(params=jax.random.fold_in(model_key, AUX_STREAM))
  ema = local.aux_weights == "ema"
  setattr(model, AUX, nnx.List([LocalAux(model.cfg, layers, ema, rngs=rngs)
                                for layers in aux_layers(model.cfg.n_layers, local)]))
  if ema:
    update_ema(model, decay=0.0)


def update_ema(model: TransformerLM, decay: float) -> None:
  """MAN: each auxiliary block's weights ← decay · themselves + (1 - decay) · the weights of
  the model layer it copies (after the optimizer step)."""
  for aux in getattr(model, AUX):
    for block, j in zip(aux.blocks, aux.layers, strict=True):
      source = dict(nnx.state(model.blocks[j], nnx.Param).flat_state())
      for path, var in nnx.state(block, EMAWeight).flat_state():
        src = source[path].get_value().astype(jnp.float32)
        var.set_value(decay * var.get_value() + (1 - decay) * src)
      nnx.update(block, nnx.state(block, EMAWeight))


def _groups_of(path, n_groups: int, layer_group: dict[int, int], tied: bool):
  """Which groups' losses reach the variable at `path` (None: every group's)."""
  head = path[0]
  if head == "blocks":
    return {layer_group[path[1]]}
  if head == AUX:
    return {path[1]}
  if head == "embed" and not tied:
    return {0}
  if head == "final_norm":
    return {n_groups - 1}
  return None  # the output projection (every loss uses it), MLGRU's lower bounds


def hand_over(out, grads):
  """The next group's input, released only with this group's gradients (a barrier: without
  it XLA may run every forward pass first and keep all groups' activations, as backprop)."""
  return jax.lax.optimization_barrier((out, grads))


def value_and_grad(cfg: Config, model: TransformerLM, batch: dict, total: jax.Array, wrt):
  """((the model's loss, {"local_loss": [G - 1] auxiliary losses}), gradients of the `wrt`
  variables as an nnx.State like nnx.state(model, wrt)): group by group, each group's
  backward pass before the next group's forward pass. `total` is the loss's denominator (the
  whole batch's weight, as in the training step)."""
  groups = group_layers(cfg.model.n_layers, cfg.local.groups)
  n = len(groups)
  layer_group = {i: g for g, layers in enumerate(groups) for i in layers}
  tied = cfg.model.tie_embeddings
  positions, segment_ids = batch["positions"], batch.get("segment_ids")
  vocab_block = cfg.train.loss_vocab_block

  def loss_of(g):
    def fn(model, h):
      x = model.embed_tokens(batch["inputs"]) if g == 0 else h
      x = model.run_layers(x, groups[g], positions, segment_ids)
      if g == n - 1:
        features = model.final_norm(x)
      else:
        features = getattr(model, AUX)[g](model, x, positions, segment_ids)
      losses = feature_losses(model, features, batch["targets"], vocab_block)
      return weighted_mean(losses, batch["weights"], total), x
    return fn

  acc: dict = {}
  h, aux_losses = None, []
  for g in range(n):
    owned = nnx.All(wrt, lambda path, _, g=g: (
        (owners := _groups_of(path, n, layer_group, tied)) is None or g in owners))
    (loss, out), grads = nnx.value_and_grad(loss_of(g), argnums=nnx.DiffState(0, owned),
                                            has_aux=True)(model, h)
    if g < n - 1:
      h, grads = hand_over(out, grads)
      aux_losses.append(loss)
    for path, var in grads.flat_state():
      value = var.get_value()
      acc[path] = value if path not in acc else acc[path] + value
  full = nnx.state(model, wrt).flat_state()
  grads = nnx.State.from_flat_path([
      (path, var.replace(acc[path] if path in acc else jnp.zeros_like(var.get_value())))
      for path, var in full])
  return (loss, {"local_loss": jnp.stack(aux_losses)}), grads
