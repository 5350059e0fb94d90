"""The optax optimizer: clip → AdamW, with linear warmup then cosine decay."""

import jax
import optax

from memx.train.config import OptimConfig

# Parameters never decayed whatever their rank: norm scales, biases and Mamba-2's per-head
# dynamics (its gated norm and conv biases are 2-D, [heads, head_dim]).
NO_DECAY = frozenset({"norm", "scale", "bias", "a_log", "d", "dt_bias"})


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay reaching min_lr_ratio·lr at the last update
  (step total_steps - 1)."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps - 1, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  # Always a chain: its state has one layout with or without clipping, so a run can resume
  # with clipping switched on or off.
  clip = optax.identity() if cfg.clip_norm is None else optax.clip_by_global_norm(cfg.clip_norm)
  return optax.chain(clip, adamw)


def decay_mask(params):
  """True for the weights AdamW decays: matrices and other tensors of rank >= 2, except the
  parameters named in NO_DECAY and any `*_bias`."""
  def decays(path, p):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = str(names[-1]) if names else ""
    return p.ndim >= 2 and name not in NO_DECAY and not name.endswith("_bias")
  return jax.tree_util.tree_map_with_path(decays, params)
