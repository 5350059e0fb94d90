"""Checkpointer: every mode round-trips exactly; retention; checksums and fallback; resharding."""

import copy
import inspect
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from memx.checkpoint import Checkpointer, state_fingerprint
from memx.checkpoint.config import CheckpointConfig
from memx.checkpoint.manager import MANIFEST
from memx.config import ParallelConfig
from memx.errors import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError
from memx.parallel.mesh import make_mesh

MODES = ("sync", "async", "lazy")


def _state(scale=1.0, width=4):
  return {"w": jnp.arange(width * 3, dtype=jnp.float32).reshape(width, 3) * scale,
          "step": jnp.int32(7), "layers": [jnp.ones(2, jnp.bfloat16) * scale]}


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_every_mode(tmp_path, mode):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode=mode, every=1, keep=2))
  for step in (1, 2, 3):
    ckpt.save(step, ckpt.begin(_state(step)), {"step": step}, {"note": "x"})
  ckpt.wait()
  assert ckpt.complete_steps() == [2, 3]  # keep=2
  restored, data, step = ckpt.restore(_state(0.0))
  assert (data, step) == ({"step": 3}, 3)
  _assert_equal(restored, _state(3))
  assert len(ckpt.blocking_s) == 3 and ckpt.size_bytes() > 0
  ckpt.close()


def test_keep_one_survives_a_crash_before_the_new_manifest(tmp_path, monkeypatch):
  """Orbax prunes old steps when it finalizes a new one, before memx writes the new one's
  manifest: a crash there must still leave `keep` complete steps (here the only one)."""
  from memx.checkpoint import manager
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="sync", every=1, keep=1))
  ckpt.save(1, ckpt.begin(_state(1)), {"step": 1}, {})
  ckpt.wait()
  real = manager.write_manifest
  monkeypatch.setattr(manager, "write_manifest", lambda d: None)  # "crash" before it
  ckpt.save(2, ckpt.begin(_state(2)), {"step": 2}, {})
  assert ckpt.complete_steps() == [1]
  _, data, _ = Checkpointer(tmp_path, ckpt.cfg).restore(_state(0.0))
  assert data == {"step": 1}
  monkeypatch.setattr(manager, "write_manifest", real)
  ckpt.discard()  # the resumed run drops the unfinished step 2 and saves it again
  for step in (2, 3):
    ckpt.save(step, ckpt.begin(_state(step)), {"step": step}, {})
  ckpt.wait()
  assert ckpt.complete_steps() == [3]  # keep=1 once the newest is complete
  ckpt.close()


def test_keep_every_keeps_milestones_forever(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="lazy", every=1, keep=2, keep_every=4))
  for step in range(1, 11):
    ckpt.save(step, ckpt.begin(_state(step)), {"step": step}, {})
  ckpt.wait()
  assert ckpt.complete_steps() == [4, 8, 9, 10]
  ckpt.close()


def test_mismatch_is_reported_before_reading(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="sync"))
  ckpt.save(1, _state(), {"step": 1}, {"run": {"seed": 0}})
  with pytest.raises(CheckpointMismatchError, match=r"\['w'\] has shape/dtype"):
    ckpt.restore(_state(width=5))
  with pytest.raises(CheckpointMismatchError, match="another run.*seed = 0 there, 1 now"):
    ckpt.restore(_state(), expect_meta={"run": {"seed": 1}})
  ckpt.close()


def test_a_config_field_added_since_the_save_still_resumes(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="sync"))
  ckpt.save(1, _state(), {"step": 1}, {"run": {"data": {"seq_len": 8}}})
  # A field the checkpoint predates, left unset (None), matches ...
  _, _, step = ckpt.restore(_state(), expect_meta={"run": {"data": {"seq_len": 8,
                                                                    "new_field": None}}})
  assert step == 1
  # ... set to anything else, it is a different run, and the message says what differs.
  with pytest.raises(CheckpointMismatchError, match="data.new_field = absent there, 3 now"):
    ckpt.restore(_state(), expect_meta={"run": {"data": {"seq_len": 8, "new_field": 3}}})
  ckpt.close()


def test_target_without_sharding_restores_as_device_arrays(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="sync"))
  ckpt.save(1, _state(), {"step": 1}, {})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
  for target in (abstract, jax.tree.map(np.asarray, _state(0.0))):
    restored, _, _ = ckpt.restore(target)
    assert all(isinstance(x, jax.Array) and x.devices() == {jax.local_devices()[0]}
               for x in jax.tree.leaves(restored))
    _assert_equal(restored, _state())
  ckpt.close()


def test_fingerprint_lists_paths_shapes_dtypes():
  fp = state_fingerprint(_state())
  assert ["['w']", "(4, 3)", "float32"] in fp
  assert ["['layers'][0]", "(2,)", "bfloat16"] in fp


def test_unfinished_save_is_invisible(tmp_path):
  """A step Orbax never finalised, or one without its manifest, is not offered for restore."""
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="sync"))
  ckpt.save(1, _state(), {"step": 1}, {})
  ckpt.save(2, _state(2.0), {"step": 2}, {})
  ckpt.close()
  (tmp_path / "2" / MANIFEST).unlink()                    # crashed before the manifest
  (tmp_path / "3.orbax-checkpoint-tmp-123").mkdir()        # crashed mid-write
  again = Checkpointer(tmp_path, CheckpointConfig(mode="sync"))
  assert again.complete_steps() == [1]
  restored, data, step = again.restore(_state(0.0))
  assert step == 1 and data == {"step": 1}
  again.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_falls_back_with_warning(tmp_path, damage, caplog):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="lazy", keep=3))
  for step in (1, 2):
    ckpt.save(step, ckpt.begin(_state(step)), {"step": step}, {})
  ckpt.wait()
  victim = max((p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = victim.read_bytes()
  if damage == "truncate":
    victim.write_bytes(data[: len(data) // 2])
  elif damage == "flip":
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
  else:
    victim.unlink()
  with caplog.at_level(logging.WARNING, logger="memx.checkpoint.manager"):
    restored, _, step = ckpt.restore(_state(0.0))
  assert step == 1
  _assert_equal(restored, _state(1))
  assert "step 2" in caplog.text and "falling back" in caplog.text
  # With every step damaged the error is clear.
  (tmp_path / "1" / MANIFEST).write_text("{not json")
  with pytest.raises(CheckpointCorruptError, match="no usable checkpoint"):
    ckpt.restore(_state(0.0))
  ckpt.close()


def test_failed_background_write_is_reported(tmp_path, monkeypatch):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="lazy"))
  ckpt.save(1, ckpt.begin(_state()), {"step": 1}, {})
  ckpt.wait()

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "save", disk_full)
  ckpt.save(2, ckpt.begin(_state(2.0)), {"step": 2}, {})  # returns: the write is queued
  with pytest.raises(CheckpointWriteError, match="No space left on device.*last good"):
    ckpt.wait()
  monkeypatch.undo()
  assert ckpt.complete_steps() == [1]
  ckpt.close()


@pytest.mark.multidevice
@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_restore_onto_another_mesh(tmp_path, mode):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh8 = make_mesh(ParallelConfig())
  sharded = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4),
                                 NamedSharding(mesh8, PartitionSpec("data"))),
             "b": jax.device_put(jnp.ones(3), NamedSharding(mesh8, PartitionSpec()))}
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode=mode))
  ckpt.save(5, ckpt.begin(sharded), {"step": 5}, {})
  ckpt.wait()
  for n in (2, 1):
    mesh = make_mesh(ParallelConfig(mesh_shape=(n,)), devices=jax.devices()[:n])
    target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                        sharding=NamedSharding(mesh, PartitionSpec("data"))),
              "b": jax.ShapeDtypeStruct((3,), jnp.float32,
                                        sharding=NamedSharding(mesh, PartitionSpec()))}
    restored, _, _ = ckpt.restore(target)
    assert restored["w"].sharding.num_devices == n
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(16, 4))
    np.testing.assert_array_equal(restored["b"], np.ones(3))
  ckpt.close()


def test_compress_setting_takes_effect_and_both_restore(tmp_path):
  zeros = {"w": jnp.zeros((256, 256), jnp.float32)}
  sizes = {}
  for compress in (True, False):
    ckpt = Checkpointer(tmp_path / str(compress), CheckpointConfig(mode="sync", compress=compress))
    ckpt.save(1, ckpt.begin(zeros), {"step": 1}, {})
    ckpt.wait()
    sizes[compress] = ckpt.size_bytes()
    ckpt.close()
  assert sizes[True] < sizes[False] - 200_000  # zstd squeezes 256 KiB of zeros to almost nothing
  for compress in (True, False):  # either checkpoint restores under either setting
    reader = Checkpointer(tmp_path / str(compress), CheckpointConfig(mode="sync",
                                                                     compress=not compress))
    restored, _, step = reader.restore({"w": jnp.ones((256, 256), jnp.float32)})
    assert step == 1
    _assert_equal(restored, zeros)
    reader.close()



def test_compress_must_be_a_bool():
  with pytest.raises(ValueError, match="checkpoint.compress"):
    CheckpointConfig(compress="yes")


def test_lazy_save_survives_the_next_donating_update(tmp_path, monkeypatch):
  """The loop's order: begin, save, then an update that donates the state's buffers while the
  write runs. The checkpoint must hold the saved values, and (Orbax >= 0.12.8) the write must
  not make Orbax's defensive second host copy of every array."""
  copies = []
  deepcopy = copy.deepcopy
  monkeypatch.setattr(copy, "deepcopy", lambda x, *a: (
      copies.append(x) if isinstance(x, np.ndarray) and x.size > 1 else None,
      deepcopy(x, *a))[1])
  release = threading.Event()
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="lazy", every=1, keep=2))
  write = ckpt._write
  monkeypatch.setattr(ckpt, "_write", lambda *a, **k: (release.wait(), write(*a, **k)))
  state = {"w": jnp.arange(1 << 16, dtype=jnp.float32)}
  ckpt.save(1, ckpt.begin(state), {}, {})
  update = jax.jit(lambda s: {"w": s["w"] * 0 - 1}, donate_argnums=0)
  state = jax.block_until_ready(update(state))  # mutates in place where XLA can donate
  release.set()
  ckpt.wait()
  restored, _, _ = ckpt.restore({"w": jnp.zeros(1 << 16, jnp.float32)})
  np.testing.assert_array_equal(restored["w"], np.arange(1 << 16, dtype=np.float32))
  if "deepcopy_host_arrays" in inspect.signature(ocp.type_handlers.NumpyHandler).parameters:
    assert not copies
  ckpt.close()


def test_discard_after_keeps_the_resume_step(tmp_path):
  # A resume from step s discards newer leftovers, never s itself: with keep = 1 a crash
  # before the next save would otherwise leave no checkpoint at all.
  ck = Checkpointer(tmp_path, CheckpointConfig(mode="sync", keep=5))
  for s in (1, 2, 3):
    ck.save(s, ck.begin({"w": jnp.ones(3) * s}), {"step": s}, {})
  ck.wait()
  ck.discard(after=2)
  assert ck.complete_steps() == [1, 2]
  state, data, step = ck.restore({"w": jnp.zeros(3)})
  assert step == 2 and data == {"step": 2}
  np.testing.assert_array_equal(state["w"], np.full(3, 2.0))
  ck.close()


def test_step_digest_tells_apart_two_states_saved_under_one_step(tmp_path):
  """A run trained again in place keeps its path and step; its checkpoint digest changes."""
  from memx.checkpoint import step_digest
  from memx.checkpoint.manager import write_manifest

  digests = []
  for value in (1.0, 2.0):
    step = tmp_path / str(value) / "10"
    step.mkdir(parents=True)
    (step / "array").write_bytes(np.full(16, value, np.float32).tobytes())
    write_manifest(step)
    digests.append(step_digest(step))
  assert digests[0] != digests[1] and all(d and len(d) == 16 for d in digests)
  assert step_digest(tmp_path / "missing") is None


def test_saves_never_consume_the_preemption_notice(tmp_path, monkeypatch):
  """JAX's preemption sync point answers True once: only the train loop may ask it (Orbax's
  save asking from the checkpoint thread swallowed a SIGTERM)."""
  import orbax.checkpoint.checkpoint_manager as orbax_manager
  from jax.experimental import multihost_utils

  calls = []
  monkeypatch.setattr(orbax_manager.utils, "reached_preemption",
                      lambda step: calls.append(step) or False)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or False)
  for mode in ("sync", "async", "lazy"):
    ckpt = Checkpointer(tmp_path / mode, CheckpointConfig(mode=mode, keep=2))
    state = {"w": jnp.arange(8.0)}
    for step in (1, 2):
      ckpt.save(step, ckpt.begin(state) if mode == "lazy" else state, {"step": step}, {})
    ckpt.wait()
    ckpt.close()
  assert calls == []


def test_closing_after_an_error_of_one_process_runs_nothing_collective(tmp_path, monkeypatch):
  """With several processes, a process leaving on its own error must not enter a barrier the
  others (still training) never reach: that deadlocked the whole job."""
  from jax.experimental import multihost_utils

  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="lazy", keep=2))
  ckpt.save(1, ckpt.begin(_state(1)), {"step": 1}, {})
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "sync_global_devices",
                      lambda name: pytest.fail(f"collective {name} after an error"))
  ckpt.close(after_error=True)
  assert ckpt._pool._shutdown and not ckpt._pending


def test_discard_removes_orbax_temporary_directories_of_unfinished_writes(tmp_path):
  """A crash inside Orbax's write leaves `<step>.orbax-checkpoint-tmp-*` (a partial state): the
  next run's discard removes it with the manifest-less steps, and keeps complete steps."""
  ckpt = Checkpointer(tmp_path, CheckpointConfig(mode="sync", keep=3))
  ckpt.save(1, ckpt.begin(_state(1)), {"step": 1}, {})
  ckpt.wait()
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "chunk").write_bytes(b"half")
  ckpt.discard()
  assert not partial.exists() and ckpt.complete_steps() == [1]
  ckpt.close()
