"""The optax optimizer: clip → AdamW, with linear warmup then cosine decay."""

import optax

from memx.train.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  if cfg.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def _decay_mask(params):
  # Decay matrices only: norm scales (1-D) are not regularised.
  import jax
  return jax.tree.map(lambda p: p.ndim >= 2, params)
