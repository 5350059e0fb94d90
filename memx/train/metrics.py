"""Metric sinks: metrics.jsonl (one JSON object per record) and TensorBoard event files."""

import json
import logging
import math
import pathlib

log = logging.getLogger(__name__)


class MetricsWriter:
  """Writes records {"step", "split", name: value, ...}; a no-op when `run_dir` is None."""

  def __init__(self, run_dir: pathlib.Path | None, *, tensorboard: bool = True,
               purge_after: int | None = None):
    """purge_after: a resume's step; TensorBoard then hides the events an earlier attempt wrote
    for later steps (its purge_step), as `truncate_after` drops them from metrics.jsonl."""
    self.path = None if run_dir is None else pathlib.Path(run_dir) / "metrics.jsonl"
    self._file = None
    self._tb = None
    if self.path is None:
      return
    self._file = open(self.path, "a", buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # GPU machines may lack it; metrics.jsonl still has everything
        log.warning("tensorboardX is not installed: no TensorBoard event files")
      else:
        self._tb = SummaryWriter(logdir=str(pathlib.Path(run_dir) / "tb"), flush_secs=30,
                                 purge_step=None if purge_after is None else purge_after + 1)

  def write(self, record: dict) -> None:
    if self._file is None:
      return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
             for k, v in record.items()}
    self._file.write(json.dumps(clean) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, int | float):
          self._tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def truncate_after(path: pathlib.Path, step: int) -> None:
  """Drop records newer than `step` (left by an interrupted attempt) before resuming."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (json.JSONDecodeError, KeyError):
      continue  # a torn last line from a crash
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(line + "\n" for line in keep))
  tmp.replace(path)


def resumed_history(path: pathlib.Path, step: int) -> tuple[list[float], dict]:
  """(train losses up to `step`, in order; the eval record at `step` without step/split, or {})
  from a run's metrics.jsonl: what a resumed loop's summary needs from before the resume."""
  if not pathlib.Path(path).exists():
    return [], {}
  losses, last_eval = [], {}
  for record in read_metrics(path):
    if record["step"] > step:
      continue
    if record["split"] == "train":
      losses.append(record["loss"])
    elif record["split"] == "eval" and record["step"] == step:
      last_eval = {k: v for k, v in record.items() if k not in ("step", "split")}
  return losses, last_eval


def read_metrics(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
