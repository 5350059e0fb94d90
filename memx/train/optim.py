"""The optax optimizer: clip → AdamW, Lion, Adafactor, GaLore, FRUGAL, APOLLO or SGD, with
linear warmup then cosine decay."""

import jax
import jax.numpy as jnp
import optax

from memx.train.apollo import scale_by_apollo
from memx.train.config import OptimConfig
from memx.train.fp8_adam import scale_by_adam_fp8
from memx.train.galore import scale_by_galore

# Parameters never decayed whatever their rank: norm scales, biases and Mamba-2's per-head
# dynamics (its gated norm and conv biases are 2-D, [heads, head_dim]).
NO_DECAY = frozenset({"norm", "scale", "bias", "a_log", "d", "dt_bias"})
FACTOR_MIN_DIM = 32


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay reaching min_lr_ratio·lr at the last update
  (step total_steps - 1)."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps - 1, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


# apollo-torch's default scales (the update is multiplied by their square root).
APOLLO_SCALE = {"apollo": 1.0, "apollo_mini": 128.0}


def make_optimizer(cfg: OptimConfig, total_steps: int, seed: int = 0
                   ) -> optax.GradientTransformation:
  """clip → cfg.name's optax transformation, with the schedule and the decay mask. seed draws
  APOLLO's random projections (the run's train.seed)."""
  lr = lr_schedule(cfg, total_steps)
  mu_dtype = None if cfg.mu_dtype is None else jnp.dtype(cfg.mu_dtype)
  if cfg.name == "adamw" and cfg.moment_quant is not None:
    opt = optax.chain(
        scale_by_adam_fp8(cfg.b1, cfg.b2, cfg.eps, expand=cfg.moment_quant == "fp8"),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr))
  elif cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "lion":
    opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype,
                     weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                      optax.scale_by_learning_rate(lr))
  elif cfg.name in ("galore", "frugal"):
    frugal = cfg.name == "frugal"
    opt = optax.chain(
        scale_by_galore(cfg.galore_rank, cfg.galore_every, 1.0 if frugal else cfg.galore_scale,
                        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eligible=lowrank_mask,
                        free_scale=cfg.frugal_free_scale if frugal else 0.0),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr))
  elif cfg.name in APOLLO_SCALE:
    mini = cfg.name == "apollo_mini"
    scale = APOLLO_SCALE[cfg.name] if cfg.apollo_scale is None else cfg.apollo_scale
    opt = optax.chain(
        scale_by_apollo(1 if mini else cfg.apollo_rank, cfg.apollo_every, scale,
                        tensorwise=mini, seed=seed, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        eligible=lowrank_mask),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr))
  else:
    # optax adds Adafactor's weight decay after its learning-rate scaling (each step takes
    # weight_decay·p whatever the lr); memx's decay is AdamW's decoupled lr·weight_decay·p, so
    # the schedule is applied last, to the update and the decay together. Adafactor's clipping
    # of the update (RMS <= 1) stays on, as in the paper; the global-norm clip below acts on
    # the gradient before it.
    # min_dim_size_to_factor 32 (optax: 128): attention weights are [d_model, heads, head_dim]
    # and Adafactor factors a tensor's two largest dims, here d_model and head_dim (64 in most
    # LLMs), keeping heads as a batch dim; at 128 they kept full second moments.
    opt = optax.chain(
        optax.adafactor(learning_rate=None, weight_decay_rate=cfg.weight_decay or None,
                        weight_decay_mask=decay_mask, min_dim_size_to_factor=FACTOR_MIN_DIM),
        optax.scale_by_learning_rate(lr, flip_sign=False))
  # Always a chain: its state has one layout with or without clipping, so a run can resume
  # with clipping switched on or off.
  clip = optax.identity() if cfg.clip_norm is None else optax.clip_by_global_norm(cfg.clip_norm)
  return optax.chain(clip, opt)


def lowrank_mask(params):
  """True for the leaves GaLore and APOLLO may project: the decayed weights inside the blocks
  (the papers project attention and MLP weights; the embedding, the output head and the MatMul-free
  model's per-layer lower bounds live outside the blocks)."""
  def allowed(path, p):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return "blocks" in names

  return jax.tree.map(lambda a, b: a and b, decay_mask(params),
                      jax.tree_util.tree_map_with_path(allowed, params))


def decay_mask(params):
  """True for the weights AdamW decays: matrices and other tensors of rank >= 2, except the
  parameters named in NO_DECAY and any `*_bias`."""
  def decays(path, p):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = str(names[-1]) if names else ""
    return p.ndim >= 2 and name not in NO_DECAY and not name.endswith("_bias")
  return jax.tree_util.tree_map_with_path(decays, params)
