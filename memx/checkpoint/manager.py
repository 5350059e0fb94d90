"""Checkpointer: Orbax CheckpointManager saving {state, data iterator, fingerprint} per step.

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never leaves a checkpoint that a restore would pick up.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from memx.checkpoint.config import CheckpointConfig
from memx.errors import CheckpointMismatchError


def state_fingerprint(state) -> list[list[str]]:
  """[path, shape, dtype] of every array: two states are compatible iff these are equal."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return [[jax.tree_util.keystr(p), str(tuple(x.shape)), str(x.dtype)] for p, x in leaves]


class Checkpointer:
  def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(directory).absolute()
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict[str, Any]) -> None:
    """Collective: every process calls it. Blocks until the step is durably written."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({**meta, "fingerprint": state_fingerprint(state)})))
    self._manager.wait_until_finished()

  def restore(self, step: int, target_state) -> tuple[Any, dict]:
    """Restores into `target_state` (arrays or ShapeDtypeStructs carrying shardings).

    Raises CheckpointMismatchError, before reading any array, when the checkpoint's state
    layout differs from the target's (a different model or optimizer config).
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    saved = meta["meta"]["fingerprint"]
    wanted = state_fingerprint(target_state)
    if saved != wanted:
      diffs = _describe_diffs(saved, wanted)
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not fit the current config: {diffs}. "
          "Resume only with the model and optimizer settings that wrote it, or start a new run "
          "(another --name or --workdir).")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def size_bytes(self, step: int | None = None) -> int | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    root = self.directory / str(step)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

  def close(self) -> None:
    self._manager.close()


def _describe_diffs(saved, wanted, limit: int = 3) -> str:
  saved_d = {p: (s, d) for p, s, d in saved}
  wanted_d = {p: (s, d) for p, s, d in wanted}
  msgs = [f"{p} is missing from the checkpoint" for p in wanted_d if p not in saved_d]
  msgs += [f"{p} is only in the checkpoint" for p in saved_d if p not in wanted_d]
  msgs += [f"{p} has shape/dtype {saved_d[p]} in the checkpoint but {wanted_d[p]} now"
           for p in wanted_d if p in saved_d and saved_d[p] != wanted_d[p]]
  more = f" (and {len(msgs) - limit} more)" if len(msgs) > limit else ""
  return "; ".join(msgs[:limit]) + more
