"""User-facing errors: bad input that the CLI reports as one paragraph, without a traceback."""


class UserError(Exception):
  """Something the user asked for is wrong; the message says what and what is allowed."""


class ConfigError(UserError, ValueError):
  """A config field holds a value that is not allowed."""


class DataError(UserError, ValueError):
  """A data file is missing or unreadable, or the data cannot serve the requested shapes."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint was written by a config whose state does not fit the current one."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the message names the first bad step."""

  def __init__(self, step: int, loss: float):
    super().__init__(
        f"loss became non-finite ({loss}) at step {step}; the run stopped and the last good "
        "checkpoint (if any) is intact. Lower optim.lr, raise optim.warmup_steps or enable "
        "optim.clip_norm.")
    self.step = step
    self.loss = loss
