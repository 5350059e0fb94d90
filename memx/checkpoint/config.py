"""CheckpointConfig: when to save, how many to keep."""

import dataclasses

from memx._validate import require


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  """Attributes:
    enabled: write checkpoints under <run>/checkpoints.
    every: save every N steps (and always at the last step).
    keep: keep the newest K checkpoints.
  """

  enabled: bool = True
  every: int = 500
  keep: int = 2

  def __post_init__(self):
    require(self.every > 0, "checkpoint", "every", self.every, "must be a positive step count")
    require(self.keep > 0, "checkpoint", "keep", self.keep, "must be >= 1")
