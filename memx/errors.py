"""User-facing errors: bad input that the CLI reports as one paragraph, without a traceback."""


class UserError(Exception):
  """Something the user asked for is wrong; the message says what and what is allowed."""


class ConfigError(UserError, ValueError):
  """A config field holds a value that is not allowed."""


class DataError(UserError, ValueError):
  """A data file is missing or unreadable, or the data cannot serve the requested shapes."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint was written by a config whose state does not fit the current one."""


class CheckpointCorruptError(UserError, ValueError):
  """No complete checkpoint passed its checksums."""


class CheckpointWriteError(RuntimeError):
  """A background checkpoint write failed; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; the current step was checkpointed and the run stopped."""

  def __init__(self, step: int):
    super().__init__(f"received SIGTERM: saved a checkpoint at step {step} and stopped; "
                     "continue with --resume.")
    self.step = step


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the message names the first bad step."""

  def __init__(self, step: int, loss: float):
    super().__init__(
        f"loss became non-finite ({loss}) at step {step}; the run stopped and the last good "
        "checkpoint (if any) is intact. Lower optim.lr, raise optim.warmup_steps or enable "
        "optim.clip_norm.")
    self.step = step
    self.loss = loss


def exception_lines(text: str) -> list[str]:
  """The lines of an error report that name an exception ("pkg.SomeError: message"), in order:
  the last one says what failed, wherever a wrapper (a traceback, submitit) put it."""
  import re  # noqa: PLC0415 - only here
  lines = [ln.strip() for ln in text.splitlines()]
  return [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", ln)]
