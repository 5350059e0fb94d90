"""CheckpointConfig: how and when to save, how many to keep."""

import dataclasses
from typing import Literal

from memx._validate import one_of, require

MODES = ("sync", "async", "lazy")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  """Attributes:
    enabled: write checkpoints under <run>/checkpoints.
    mode: "sync" (Orbax blocking save), "async" (Orbax's async save: blocking device-to-host
      copy, background write) or "lazy" (the device-to-host copy overlaps the next step's
      forward and backward; background write). See memx/checkpoint/manager.py.
    every: save every N steps (and always at the last step).
    keep: keep the newest K checkpoints.
    keep_every: also keep every M-th step forever (0 = none).
    save_on_sigterm: on SIGTERM (preemption), save the current step, then stop.
    compress: zstd-compress the arrays (Orbax's default). Off by default: float weights and
      Adam moments shrink by only ~7% under zstd, while compressing is about a third of the
      write's CPU time (CPU, 30 MiB state: 165 -> 104 ms), CPU a background write takes from
      training (benchmarks/RESULTS.md, "Uncompressed checkpoint writes"). Restore reads
      either kind.
  """

  enabled: bool = True
  mode: Literal["sync", "async", "lazy"] = "lazy"
  every: int = 500
  keep: int = 2
  keep_every: int = 0
  save_on_sigterm: bool = True
  compress: bool = False

  def __post_init__(self):
    one_of("checkpoint", "mode", self.mode, MODES)
    require(self.every > 0, "checkpoint", "every", self.every, "must be a positive step count")
    require(self.keep > 0, "checkpoint", "keep", self.keep, "must be >= 1")
    require(isinstance(self.compress, bool), "checkpoint", "compress", self.compress,
            "must be true or false")
    require(self.keep_every >= 0, "checkpoint", "keep_every", self.keep_every,
            "must be >= 0 (0 = keep no extra checkpoints)")
