"""MoA plans rows of one document: document-masked training rows are refused, task rows kept."""

import pytest

from memx.data import DataConfig
from memx.errors import UserError
from memx.sparse.profile import ProfileError, calibration_data
from memx.sparse.validate import guard_source


def test_document_masked_rows_are_refused_for_profiles_and_the_guard():
  docs = DataConfig(source="text", paths=("a.txt",), document_mask=True)
  with pytest.raises(ProfileError, match="calibration 'train'.*data.document_mask"):
    calibration_data(docs, "train")
  with pytest.raises(ProfileError, match="calibration 'auto'") as e:
    calibration_data(docs, "auto")  # no task: the training rows
  assert "calibration 'task'" not in str(e.value)  # (this run has none to offer)
  with pytest.raises(UserError, match="the LM-loss guard.*data.document_mask"):
    guard_source(docs)
  mixed = DataConfig(source="text", paths=("a.txt",), document_mask=True, task="passkey",
                     task_fraction=0.5)
  task = calibration_data(mixed, "task")  # task rows are one document each
  with pytest.raises(ProfileError, match="calibrate on the run's task"):
    calibration_data(mixed, "train")
  assert (task.source, task.task) == ("passkey", None)


def test_runs_with_a_separator_profile_and_evaluate_on_their_task():
  from flax import nnx

  from memx.models.config import ModelConfig
  from memx.models.transformer import TransformerLM
  from memx.sparse.evaluate import evaluate

  cfg = DataConfig(seq_len=64, text_separator="\n\n", task="mqar", task_fraction=0.5,
                   mqar_pairs=2)
  assert calibration_data(cfg, "task").text_separator is None
  model = TransformerLM(ModelConfig(vocab_size=264, d_model=16, n_layers=1, n_heads=2),
                        rngs=nnx.Rngs(0))
  out = evaluate(model, cfg, [128], depths=(0.5,), batches=1, batch_size=2, decode_new_tokens=2)
  assert out["columns"]
