"""stage.microbatches: a distillation step in pieces (teacher pass included) gives the whole
batch's loss terms and update; compare() in pieces gives the batch's metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.distill import runner
from memx.distill.config import STAGE2, STAGE3, StageConfig, StudentConfig
from memx.distill.seed import build_student, converted_layers
from memx.distill.stages import compare, compile_program, make_step, stage_optim, trainable_filter
from memx.errors import ConfigError
from memx.models.transformer import TransformerLM
from memx.train.optim import make_optimizer


def _batch(cfg, b=4, t=16):
  """Rows with unequal weights (the last row weighs only 3 tokens), so microbatch shares of
  the cross-entropy differ and only the batch's total weight gives its mean."""
  tokens = jax.random.randint(jax.random.key(0), (b, t + 1), 0, cfg.vocab_size)
  weights = jnp.ones((b, t), jnp.float32).at[-1, 3:].set(0.0)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
          "answer_mask": weights.at[:, :-2].set(0.0) > 0}


def _setup(teacher_cfg, stage):
  cfg = teacher_cfg.model
  teacher = TransformerLM(cfg, rngs=nnx.Rngs(0))
  student_cfg = StudentConfig(kind="hybrid", every=2)
  layers = converted_layers(cfg, student_cfg)
  student = build_student(teacher, student_cfg)
  noise = jax.random.normal(jax.random.key(5), student.embed[...].shape)
  student.embed[...] = student.embed[...] + 0.2 * noise
  filt = trainable_filter(stage.trainable, layers)
  opt = nnx.Optimizer(student, make_optimizer(stage_optim(stage), stage.steps), wrt=filt)
  graphdef, state = nnx.split((student, opt))
  t_graphdef, t_state = nnx.split(teacher)
  return layers, filt, graphdef, state, t_graphdef, t_state


@pytest.mark.parametrize("stage", [
    dataclasses.replace(STAGE2, warmup_steps=0, steps=2),
    dataclasses.replace(STAGE3, warmup_steps=0, steps=2, ce_weight=0.5, temperature=2.0)],
    ids=["layer_mse", "kl_ce"])
def test_microbatched_stage_step_equals_the_whole_batch(teacher_cfg, stage):
  layers, filt, graphdef, state, t_graphdef, t_state = _setup(teacher_cfg, stage)
  batch = _batch(teacher_cfg.model)
  out = {}
  for n in (1, 2, 4):
    s = dataclasses.replace(stage, microbatches=n)
    step = compile_program(make_step(s, graphdef, t_graphdef, layers, filt),
                           (state, t_state, batch))
    out[n] = step(state, t_state, batch)
  (s1, m1) = out[1]
  for n in (2, 4):
    sn, mn = out[n]
    assert set(mn) == set(m1)
    for k in m1:
      np.testing.assert_allclose(mn[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(sn), jax.tree.leaves(s1), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compare_in_pieces_equals_the_whole_batch(teacher_cfg):
  layers, _, graphdef, state, t_graphdef, t_state = _setup(teacher_cfg, STAGE3)
  student = nnx.merge(graphdef, state)[0]
  s_graphdef, s_state = nnx.split(student)
  batch = _batch(teacher_cfg.model)
  one = jax.device_get(compare(s_graphdef, s_state, t_graphdef, t_state, batch, layers))
  two = jax.device_get(compare(s_graphdef, s_state, t_graphdef, t_state, batch, layers, 2))
  assert set(one) == set(two)
  assert one["answers"] > 0 and one["kl"] > 0
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=2e-5, err_msg=k)


def test_bad_counts_and_resume_identity():
  with pytest.raises(ConfigError, match="stage3.microbatches"):
    StageConfig(index=3, batch_size=8, microbatches=3)
  with pytest.raises(ConfigError, match="microbatches"):
    StageConfig(microbatches=0)
  # A stage may resume with another count, and stage.json files written before the field
  # existed still match.
  ident = runner._stage_identity(dataclasses.replace(STAGE2, microbatches=4))
  assert "microbatches" not in ident and ident == runner._stage_identity(STAGE2)


def test_sweep_hash_of_a_distillation_leaves_out_the_default_count():
  """A sweep hashes a distillation entry's DistillConfig: stage microbatches at 1 are left
  out (finished entries keep their hash), any other count is hashed."""
  from memx.config import drop_neutral, to_dict
  from memx.distill.config import HASH_NEUTRAL, DistillConfig

  plain = drop_neutral(to_dict(DistillConfig()), HASH_NEUTRAL)
  assert all("microbatches" not in plain[f"stage{k}"] for k in (1, 2, 3))
  four = DistillConfig(stage3=dataclasses.replace(STAGE3, microbatches=4))
  assert drop_neutral(to_dict(four), HASH_NEUTRAL)["stage3"]["microbatches"] == 4
