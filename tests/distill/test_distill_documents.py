"""Distillation on document-masked batches: teacher, student and every stage loss see each
document apart (the oracle: the documents run one at a time)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx.data import document_layout
from memx.distill.capture import calibrate, teacher_pass
from memx.distill.config import STAGE1, STAGE3, StudentConfig
from memx.distill.seed import build_student, converted_layers
from memx.distill.stages import _stage_losses
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM

EOS = 63
TEACHER = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _doc_batch(docs):
  """A loader-style batch of one row: the documents' tokens in a row (inputs and targets
  shifted by one), with their segment ids and positions."""
  row = np.concatenate(docs)[None]
  seg, pos = document_layout(row, EOS)

  def batch(tokens, **kw):
    t = tokens.shape[1] - 1
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "weights": jnp.ones((1, t), jnp.float32), "answer_mask": jnp.zeros((1, t), bool),
            **{k: jnp.asarray(v[:, :-1]) for k, v in kw.items()}}

  return batch(row, segment_ids=seg, positions=pos)


def test_teacher_pass_and_stage_losses_follow_documents():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, EOS, 9) for _ in range(2)]
  docs[1][0] = EOS
  packed = _doc_batch(docs + [np.array([EOS])])  # 18 tokens: 2 documents of 9 inputs
  apart = [_doc_batch([np.concatenate([d, [EOS]])]) for d in docs]
  teacher = TransformerLM(TEACHER, rngs=nnx.Rngs(0))
  student_cfg = StudentConfig(kind="hybrid", every=2)
  layers = converted_layers(TEACHER, student_cfg)
  stats, _ = calibrate(teacher, [packed], layers)
  student = build_student(teacher, student_cfg, stats=stats)

  kw = {"positions": packed["positions"], "segment_ids": packed["segment_ids"]}
  out = teacher_pass(teacher, packed["inputs"], layers, **kw)
  np.testing.assert_allclose(out[0], teacher(packed["inputs"], **kw), rtol=1e-5, atol=1e-6)
  alone = [teacher_pass(teacher, b["inputs"], layers) for b in apart]
  np.testing.assert_allclose(out[0], jnp.concatenate([a[0] for a in alone], 1), rtol=1e-4,
                             atol=1e-5)
  for stage in (STAGE1, STAGE3):  # layer-wise MSE (the student's mixer), end-to-end KL + CE
    loss, terms = _stage_losses(stage, student, packed, layers, out)
    parts = [_stage_losses(stage, student, b, layers, a) for b, a in zip(apart, alone,
                                                                          strict=True)]
    # Two documents of equal length: the packed row's token means are the documents' means.
    np.testing.assert_allclose(loss, np.mean([p[0] for p in parts]), rtol=1e-4)
    for k, v in terms.items():
      np.testing.assert_allclose(v, np.mean([p[1][k] for p in parts]), rtol=1e-4, err_msg=k)
