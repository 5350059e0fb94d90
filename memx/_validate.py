"""Small helpers for config validation messages: name the field, the bad value, what is allowed."""

from typing import Any

from memx.errors import ConfigError


def require(cond: bool, owner: str, field: str, value: Any, allowed: str) -> None:
  if not cond:
    raise ConfigError(f"{owner}.{field} = {value!r} is not allowed: {allowed}.")


def one_of(owner: str, field: str, value: Any, options) -> None:
  require(value in options, owner, field, value, f"expected one of {sorted(map(str, options))}")
