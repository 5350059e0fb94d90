"""The optimizer: which parameters decay, the learning-rate schedule's ends."""

import jax
import numpy as np
import pytest
from flax import nnx

from memx.models.config import ModelConfig, SSMConfig
from memx.models.transformer import TransformerLM
from memx.train.config import OptimConfig
from memx.train.optim import decay_mask, lr_schedule, make_optimizer


def test_decay_mask_spares_norms_biases_and_ssm_dynamics():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                    mixers=("mamba2", "attention"),
                    ssm=SSMConfig(d_state=16, head_dim=16, n_groups=2, chunk_size=16))
  params = nnx.state(TransformerLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  mask = {jax.tree_util.keystr(p): m
          for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
  spared = {k for k, m in mask.items() if not m}
  mixer = "['blocks'][0]['mixer']"
  # Mamba-2's gated norm and conv biases are 2-D, [heads, head_dim], and are still spared.
  for name in ("norm", "conv_x_bias", "conv_b_bias", "conv_c_bias", "a_log", "d", "dt_bias"):
    assert f"{mixer}['{name}'].value" in spared
  for name in ("w_x", "w_z", "w_b", "w_c", "w_dt", "w_out", "conv_x"):
    assert mask[f"{mixer}['{name}'].value"]
  assert mask["['blocks'][1]['attn']['wq'].value"] and mask["['embed'].value"]
  assert not mask["['final_norm']['scale'].value"]
  # Applied: with zero gradients only the decayed weights move.
  opt = make_optimizer(OptimConfig(lr=1.0, warmup_steps=0, weight_decay=0.5), 10)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  moved = {jax.tree_util.keystr(p): bool(np.any(np.asarray(u) != 0))
           for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert moved == mask


@pytest.mark.parametrize("steps, warmup", [(100, 10), (10, 0), (2, 5)])
def test_schedule_reaches_its_final_lr_at_the_last_update(steps, warmup):
  """Warmup from 0 to the peak at step w, then cosine down to min_lr_ratio·lr exactly at the
  last update, step steps - 1 (a run too short to decay ends at the peak)."""
  cfg = OptimConfig(lr=1.0, warmup_steps=warmup, min_lr_ratio=0.1)
  sched = lr_schedule(cfg, steps)
  w = min(warmup, steps - 1)
  if w:
    assert float(sched(0)) == 0.0 and float(sched(w)) == pytest.approx(1.0)
  final = 0.1 if steps - 1 > w else 1.0
  assert float(sched(steps - 1)) == pytest.approx(final, rel=1e-6)
  assert all(final - 1e-6 <= float(sched(t)) <= 1.0 + 1e-6 for t in range(w, steps))


def test_clipping_keeps_the_optimizer_state_layout():
  params = {"w": np.ones((3, 3), np.float32)}
  states = [make_optimizer(OptimConfig(clip_norm=c), 10).init(params) for c in (None, 1.0)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])


def test_decay_mask_spares_every_norm_of_the_matmulfree_model():
  # There the rank rule alone spares MLGRU's h_norm (no NO_DECAY name covers it).
  from memx.models.config import matmulfree_config
  model = TransformerLM(matmulfree_config(vocab_size=32, d_model=16, n_layers=2, n_heads=2),
                        rngs=nnx.Rngs(0))
  mask = decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  norms = [k for k in flat if "norm" in k]
  assert any("h_norm" in k for k in norms)
  assert not any(flat[k] for k in norms), [k for k in norms if flat[k]]
