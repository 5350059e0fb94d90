"""Checkpointer: sync, async and lazy saves on Orbax, with checksums and crash consistency.

What a checkpoint holds: the train state (parameters, optimizer state and step), the data
iterator state, and meta (the config, seeds, the state's fingerprint). Layout per step:
`<dir>/<step>/{state,data,meta}/...` written by Orbax, plus `<dir>/<step>/manifest.json`.

Crash consistency. Orbax writes a step into a temporary directory and renames it when complete.
memx then writes `manifest.json` (size and CRC32 of every file) by temp file + rename; a step
counts as complete only once its manifest exists. A crash at any point leaves the previous
complete step restorable, and `restore` verifies the manifest, falling back (with a warning)
to the previous complete step when a file is missing, truncated or corrupt; `discard` then
deletes the newer, damaged steps (and tells Orbax, whose cached step list would otherwise refuse
to save those step numbers again). Retention: Orbax prunes when it finalizes a new step, before
its manifest exists, so it is asked to keep K + 1 steps (K complete ones survive a crash in
that window) and `wait` trims to K once the newest is complete.

Modes and their ordering guarantees (the loop calls `begin` after the step whose state is
saved, runs the next step's forward and backward, then calls `save` before the update):
- sync:  `save` writes everything before returning.
- async: Orbax's async save as shipped: `save` blocks for the device-to-host copy, then Orbax
  writes in a background thread.
- lazy:  `begin` starts `copy_to_host_async()` on every array and returns at once; the next
  step's forward/backward (which only read the state) run while the copy proceeds. The next
  optimizer update donates the state's buffers (JAX's form of in-place mutation), so `save`
  first waits for the host copies to complete, then queues the write of the host arrays to a
  background thread. The copy is therefore always of the saved step, and the loop blocks only
  for whatever part of the copy outlasts a forward+backward.
A failed background write is re-raised as CheckpointWriteError at the next `save`, `poll` or
`wait`: a run never continues silently without checkpoints.

What a background write costs the step. The copy is the device's; the write is host CPU: Orbax
and TensorStore take ~100 ms of CPU per save of a 30 MiB state (fixed costs plus ~0.7 ms per
array), and zstd compression another ~50 ms. Where the host CPU also runs the step (the CPU
backend) or feeds it, that time is taken from training. So arrays are stored uncompressed by
default (`CheckpointConfig.compress`). Lowering the writer's CPU priority (nice 19, or
SCHED_IDLE, for memx's writer and TensorStore's workers) was tried and measured worse: the
write then outlasts a step, the next save waits for it, and the step did not get faster.
"""

import concurrent.futures
import contextlib
import hashlib
import inspect
import json
import logging
import pathlib
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from memx._validate import describe_differences
from memx.checkpoint.config import CheckpointConfig
from memx.errors import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class _OrbaxManager(ocp.CheckpointManager):
  """Orbax's manager, except that it never asks JAX's preemption sync point: memx's train loop
  polls it once per step and saves on it. JAX answers True once (it keeps one "last step"
  counter), and Orbax asks too, from save() and its finalize thread with older step numbers:
  whichever asked first at the agreed step consumed the notice, and the loop trained on past a
  SIGTERM (then lost the work at the scheduler's SIGKILL)."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def state_fingerprint(state) -> list[list[str]]:
  """[path, shape, dtype] of every array: two states are compatible iff these are equal."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return [[jax.tree_util.keystr(p), str(tuple(x.shape)), str(x.dtype)] for p, x in leaves]


def _crc32(path: pathlib.Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(step_dir: pathlib.Path) -> None:
  files = {}
  for f in sorted(step_dir.rglob("*")):
    if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp"):
      files[str(f.relative_to(step_dir))] = [f.stat().st_size, _crc32(f)]
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": files}))
  tmp.replace(step_dir / MANIFEST)


def step_digest(step_dir: pathlib.Path) -> str | None:
  """A short digest of a complete step's contents (its manifest: every file's size and CRC32),
  None when it has no manifest: tells apart two states saved under the same path and step
  (a run trained again in place)."""
  try:
    return hashlib.sha256((pathlib.Path(step_dir) / MANIFEST).read_bytes()).hexdigest()[:16]
  except OSError:
    return None


def verify_manifest(step_dir: pathlib.Path) -> str | None:
  """None when every listed file has its recorded size and CRC32; else what is wrong."""
  try:
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"unreadable manifest ({e})"
  for rel, (size, crc) in files.items():
    f = step_dir / rel
    if not f.is_file():
      return f"{rel} is missing"
    if f.stat().st_size != size:
      return f"{rel} is truncated or resized ({f.stat().st_size} bytes, expected {size})"
    if _crc32(f) != crc:
      return f"{rel} fails its checksum"
  return None


class _LazySnapshot:
  """Host copies in flight for one step's state (see the module docstring)."""

  def __init__(self, state):
    self.state = state
    for x in jax.tree.leaves(state):
      if isinstance(x, jax.Array) and x.is_fully_addressable:
        x.copy_to_host_async()

  def to_host(self):
    """Waits for the copies; returns numpy arrays (one replica of each replicated array)."""
    def host(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # Multi-host sharded arrays stay jax.Arrays; Orbax saves each host's shards.
        return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
      return np.asarray(x)
    out = jax.tree.map(host, self.state)
    self.state = None  # release the device buffers
    return out


class Checkpointer:
  def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(directory).absolute()
    self.cfg = cfg
    self.blocking_s: list[float] = []  # main-thread time spent per save
    # The part of it spent waiting for the previous save's write (one write in flight): the
    # disk being slower than the save cadence, not the snapshot itself.
    self.write_wait_s: list[float] = []
    self._error: BaseException | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
    self._pending: list[concurrent.futures.Future] = []
    # Orbax deletes old steps when it finalizes a new one, before memx has written the new
    # one's manifest: with keep = K it would leave K - 1 complete steps in that window (none for
    # K = 1). Asking it for K + 1 keeps K complete steps through any crash; `wait` trims the
    # extra one once the newest is complete.
    # Several processes: Orbax's barriers go through the distributed runtime's coordination
    # service (named `active_processes`: all of them), not device collectives. A lazy save runs
    # Orbax on memx's writer thread while the main thread runs training steps; a collective
    # barrier there interleaves with the steps' collectives differently on each process and
    # deadlocked runs with more than one device per process. (Orbax takes `create` only without
    # active_processes: the directory is made here.)
    multi = jax.process_count() > 1
    if multi:
      self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep + 1, keep_period=cfg.keep_every or None, create=not multi,
        enable_async_checkpointing=cfg.mode == "async",
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            active_processes=set(range(jax.process_count())) if multi else None))
    state_handler = ocp.PyTreeCheckpointHandler(
        use_compression=cfg.compress, type_handler_registry=_type_handlers(cfg.mode))
    handlers = {"state": state_handler,
                "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._manager = _OrbaxManager(self.directory, options=options, item_handlers=handlers)

  # ------------------------------------------------------------------ saving
  def begin(self, state) -> Any:
    """Called right after the step whose state will be saved; lazy mode starts copying."""
    return _LazySnapshot(state) if self.cfg.mode == "lazy" else state

  def save(self, step: int, snapshot, data_state: dict, meta: dict[str, Any]) -> None:
    """Saves the state passed to `begin`. Must be called before that state is donated."""
    self.poll()
    t0 = time.perf_counter()
    if self.cfg.mode == "lazy":
      if not isinstance(snapshot, _LazySnapshot):
        snapshot = _LazySnapshot(snapshot)
      # One write in flight, as Orbax does: host memory stays bounded when writes are slower
      # than steps (then the loop waits here, for the disk, not for the copy).
      self._drain()
      self.write_wait_s.append(time.perf_counter() - t0)
      host_state = snapshot.to_host()
      self.blocking_s.append(time.perf_counter() - t0)
      self._pending.append(self._pool.submit(self._write, step, host_state, data_state, meta))
      return
    if self.cfg.mode == "async":
      self._drain()  # Orbax allows one save in flight
      self._manager.wait_until_finished()
    self.write_wait_s.append(time.perf_counter() - t0)
    self._write(step, snapshot, data_state, meta, background=False)
    self.blocking_s.append(time.perf_counter() - t0)
    if self.cfg.mode == "async":  # Orbax writes in its thread; ours adds the manifest after
      self._pending.append(self._pool.submit(self._finish_async, step))

  def _args(self, state, data_state, meta):
    return ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({**meta, "fingerprint": state_fingerprint(state)}))

  def _write(self, step, state, data_state, meta, background: bool = True) -> None:
    try:
      self._manager.save(step, args=self._args(state, data_state, meta), force=True)
      if self.cfg.mode != "async":
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
          write_manifest(self.directory / str(step))
    except BaseException as e:
      if not background:
        raise CheckpointWriteError(f"saving checkpoint step {step} to {self.directory} failed: "
                                   f"{e}. The last good checkpoint is kept.") from e
      self._error = e

  def _finish_async(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        write_manifest(self.directory / str(step))
    except BaseException as e:  # surfaced by poll()
      self._error = e

  def _drain(self) -> None:
    for f in self._pending:
      f.result()
    self._pending.clear()

  def poll(self) -> None:
    """Re-raises a failed background write."""
    if self._error is not None:
      e, self._error = self._error, None
      raise CheckpointWriteError(f"a background checkpoint write to {self.directory} failed: "
                                 f"{type(e).__name__}: {e}. The last good checkpoint is kept.")

  def wait(self) -> None:
    """Blocks until every queued write is durable (and its manifest written), then keeps the
    newest `keep` complete steps (and every `keep_every`-th). Collective."""
    self._drain()
    self._manager.wait_until_finished()
    self.poll()
    if jax.process_index() == 0:
      steps = self.complete_steps()
      for s in steps[:-self.cfg.keep]:
        if not (self.cfg.keep_every and s % self.cfg.keep_every == 0):
          shutil.rmtree(self.directory / str(s), ignore_errors=True)
    if jax.process_count() > 1:  # process 0 writes manifests: everyone sees them after this
      multihost_utils.sync_global_devices("memx-checkpoint-wait")
    self._manager.reload()  # Orbax caches its steps: forget the ones deleted behind its back

  def discard(self, after: int | None = None) -> None:
    """Deletes unfinished steps (a crash's leftovers) and, given `after`, every step newer than
    the one training continues from (corrupt ones a restore fell back from), so that the steps
    can be saved again. Collective."""
    if jax.process_index() == 0:
      remove_incomplete(self.directory, after=after)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("memx-checkpoint-discard")
    self._manager.reload()

  # ------------------------------------------------------------------ reading
  def complete_steps(self) -> list[int]:
    """Steps whose manifest exists (finalized by Orbax and checksummed), oldest first."""
    if not self.directory.is_dir():
      return []
    steps = [int(p.name) for p in self.directory.iterdir()
             if p.name.isdigit() and (p / MANIFEST).is_file()]
    return sorted(steps)

  def latest_step(self) -> int | None:
    steps = self.complete_steps()
    return steps[-1] if steps else None

  def restore(self, target_state, step: int | None = None,
              expect_meta: dict | None = None) -> tuple[Any, dict, int]:
    """Restores the newest complete, uncorrupted step (or `step`) into `target_state`.

    target_state: arrays or ShapeDtypeStructs; their shardings place the restored arrays,
      so a checkpoint restores onto any mesh (leaves without one: the first local device).
    expect_meta: {key: value} that must equal the checkpoint's meta (e.g. the run identity).
    Returns (state, data_state, step). Raises CheckpointMismatchError before reading any array
    when the checkpoint belongs to another run or its state layout differs from the target's,
    and CheckpointCorruptError when no complete step passes its checksums.
    """
    self.wait()
    # A target without a sharding (numpy, or an abstract state) lands on the first local device,
    # as a jax.Array.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or local),
        target_state)
    candidates = [step] if step is not None else self.complete_steps()[::-1]
    problems = []
    for s in candidates:
      reason = verify_manifest(self.directory / str(s))
      if reason is not None:
        problems.append(f"step {s}: {reason}")
        log.warning("checkpoint step %d in %s is corrupt (%s); falling back to the previous "
                    "complete checkpoint", s, self.directory, reason)
        continue
      meta = self._manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
      self._check_meta(s, meta, target_state, expect_meta or {})
      out = self._manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
          data=ocp.args.JsonRestore()))
      return out["state"], out["data"], s
    raise CheckpointCorruptError(
        f"no usable checkpoint in {self.directory}: " + ("; ".join(problems) or "none is complete")
        + ". Start a new run, or restore a copy of the checkpoint directory.")

  def _check_meta(self, step, meta, target_state, expect):
    for key, want in expect.items():
      have = meta.get(key)
      if isinstance(have, dict) and isinstance(want, dict):
        diffs = describe_differences(have, want)
      else:
        diffs = "" if have == want else f"{have!r} vs {want!r}"
      if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} was written by another run ({key} differs: "
            f"{diffs}). Resume only the run that wrote it, or use another --name/--workdir.")
    saved, wanted = meta["fingerprint"], state_fingerprint(target_state)
    if saved != wanted:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not fit the current config: "
          f"{_describe_diffs(saved, wanted)}. Resume only with the model and optimizer settings "
          "that wrote it, or start a new run (another --name or --workdir).")

  def size_bytes(self, step: int | None = None) -> int | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    root = self.directory / str(step)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

  def close(self, *, after_error: bool = False) -> None:
    """Waits for the queued writes, keeps the newest steps and releases Orbax. Collective.

    after_error: this process alone is leaving on an error while the others may be inside a
    training step (or gone). With several processes nothing collective may run then (it would
    wait for them forever, and their heartbeat would not notice a live process): the local
    writes are drained, their errors dropped (the run's own error is the one to report), no
    step is trimmed or finalized together, and Orbax's manager is left to the process exit."""
    if after_error and jax.process_count() > 1:
      for f in self._pending:
        with contextlib.suppress(BaseException):
          f.result()
      self._pending.clear()
      self._pool.shutdown(wait=True)
      return
    try:
      self.wait()
    finally:
      self._pool.shutdown(wait=True)
      self._manager.close()


def _type_handlers(mode: str):
  """Orbax's standard handlers; in lazy mode numpy arrays are written without a copy.

  Orbax deep-copies every numpy array it is given to save (a guard against the caller mutating
  it during the background write): a second full host copy of the state per save (27 ms of CPU
  for 30 MiB). A lazy snapshot's host arrays are the checkpointer's own and never mutated (on
  the CPU backend they are read-only views, and XLA does not donate a buffer with a live view),
  so the guard buys nothing there. Older Orbax (0.12.4) has no such option and keeps copying.
  """
  handlers = {ty: ocp.type_handlers.get_type_handler(ty)
              for ty in ocp.type_handlers.supported_types()}
  if mode == "lazy" and "deepcopy_host_arrays" in inspect.signature(
      ocp.type_handlers.NumpyHandler).parameters:
    handlers[np.ndarray] = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  return ocp.type_handlers.create_type_handler_registry(*handlers.items())


def remove_incomplete(directory: pathlib.Path, after: int | None = None) -> None:
  """Deletes steps without a manifest (left by a crash), Orbax's temporary directories of
  unfinished writes (`<step>.orbax-checkpoint-tmp-*`, a partial state each), and, given
  `after`, every step newer than the one training continues from (corrupt ones a restore fell
  back from)."""
  directory = pathlib.Path(directory)
  if directory.is_dir():
    for p in directory.iterdir():
      unfinished = p.is_dir() and ".orbax-checkpoint-tmp" in p.name
      if unfinished or (p.is_dir() and p.name.isdigit() and (
          not (p / MANIFEST).is_file() or (after is not None and int(p.name) > after))):
        shutil.rmtree(p, ignore_errors=True)


def _describe_diffs(saved, wanted, limit: int = 3) -> str:
  saved_d = {p: (s, d) for p, s, d in saved}
  wanted_d = {p: (s, d) for p, s, d in wanted}
  msgs = [f"{p} is missing from the checkpoint" for p in wanted_d if p not in saved_d]
  msgs += [f"{p} is only in the checkpoint" for p in saved_d if p not in wanted_d]
  msgs += [f"{p} has shape/dtype {saved_d[p]} in the checkpoint but {wanted_d[p]} now"
           for p in wanted_d if p in saved_d and saved_d[p] != wanted_d[p]]
  more = f" (and {len(msgs) - limit} more)" if len(msgs) > limit else ""
  return "; ".join(msgs[:limit]) + more
