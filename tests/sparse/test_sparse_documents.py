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
  with pytest.raises(ProfileError, match="calibration 'auto'|calibration 'train'"):
    calibration_data(docs, "auto")  # no task: the training rows
  with pytest.raises(UserError, match="the LM-loss guard.*data.document_mask"):
    guard_source(docs)
  mixed = DataConfig(source="text", paths=("a.txt",), document_mask=True, task="passkey",
                     task_fraction=0.5)
  task = calibration_data(mixed, "task")  # task rows are one document each
  assert (task.source, task.task) == ("passkey", None)
