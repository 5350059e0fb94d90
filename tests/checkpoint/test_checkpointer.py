"""Checkpointer: round trip with data state, keep-K, fingerprint mismatch, no partial steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.checkpoint import Checkpointer, state_fingerprint
from memx.checkpoint.config import CheckpointConfig
from memx.errors import CheckpointMismatchError


def _state(scale=1.0, width=4):
  return {"w": jnp.arange(width * 3, dtype=jnp.float32).reshape(width, 3) * scale,
          "step": jnp.int32(7), "layers": [jnp.ones(2, jnp.bfloat16)]}


def test_round_trip_and_keep(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(every=1, keep=2))
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"step": step}, {"note": "x"})
  assert ckpt.latest_step() == 3
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
  restored, data = ckpt.restore(3, _state(0.0))
  assert data == {"step": 3}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3)), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert a.dtype == b.dtype
  assert ckpt.size_bytes() > 0
  ckpt.close()


def test_mismatch_is_reported_before_reading(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig())
  ckpt.save(1, _state(), {"step": 1}, {})
  with pytest.raises(CheckpointMismatchError, match=r"\['w'\] has shape/dtype"):
    ckpt.restore(1, _state(width=5))
  ckpt.close()


def test_fingerprint_lists_paths_shapes_dtypes():
  fp = state_fingerprint(_state())
  assert ["['w']", "(4, 3)", "float32"] in fp
  assert ["['layers'][0]", "(2,)", "bfloat16"] in fp


def test_unfinished_save_is_invisible(tmp_path):
  """A step directory Orbax never finalised (a crash mid-save) is not offered for restore."""
  ckpt = Checkpointer(tmp_path, CheckpointConfig())
  ckpt.save(1, _state(), {"step": 1}, {})
  ckpt.close()
  # Simulate a crash during the save of step 2: Orbax's temporary directory is left behind.
  (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
  (tmp_path / "2.orbax-checkpoint-tmp-123" / "partial").write_text("torn")
  again = Checkpointer(tmp_path, CheckpointConfig())
  assert again.latest_step() == 1
  restored, data = again.restore(1, _state(0.0))
  assert data == {"step": 1}
  again.close()
