"""The checks every kernel's `BlockSizes.__post_init__` shares.

Each raises ValueError naming the field, its value and what is allowed, so a bad tile fails
when the BlockSizes is built, before any tracing.
"""

from typing import Any

WARPS = (1, 2, 4, 8, 16)


def is_pow2(x: Any, lo: int) -> bool:
  """True for an int (not a bool) that is a power of two and at least `lo`."""
  return isinstance(x, int) and not isinstance(x, bool) and x >= lo and x & (x - 1) == 0


def _bad(f: str, v: Any, allowed: str) -> ValueError:
  return ValueError(f"BlockSizes.{f} = {v!r} is not allowed: {allowed}.")


def check_pow2(blocks, *fields: str, lo: int, why: str = "", optional: bool = False) -> None:
  """Each field is a power of two >= lo (or None when `optional`); `why` ends the message."""
  for f in fields:
    v = getattr(blocks, f)
    if not (optional and v is None) and not is_pow2(v, lo):
      raise _bad(f, v, f"must be {'None or ' if optional else ''}a power of two >= {lo}{why}")


def check_launch(blocks, warps: tuple[str, ...] = (), stages: tuple[str, ...] = (),
                 optional_warps: tuple[str, ...] = ()) -> None:
  """Triton launch settings: warps in WARPS (or None for `optional_warps`), stages in [1, 8]."""
  for f in (*warps, *optional_warps):
    v = getattr(blocks, f)
    if not (f in optional_warps and v is None) and (
        not isinstance(v, int) or isinstance(v, bool) or v not in WARPS):
      none = "None or " if f in optional_warps else ""
      raise _bad(f, v, f"expected {none}one of {', '.join(map(str, WARPS))}")
  for f in stages:
    v = getattr(blocks, f)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8:
      raise _bad(f, v, "must be an int in [1, 8]")


def check_bool(blocks, *fields: str) -> None:
  for f in fields:
    if not isinstance(getattr(blocks, f), bool):
      raise _bad(f, getattr(blocks, f), "must be a bool")


def check_choice(blocks, field: str, choices: tuple[str, ...]) -> None:
  v = getattr(blocks, field)
  if v not in choices:
    names = list(map(repr, choices))
    raise _bad(field, v, f"expected {', '.join(names[:-1])} or {names[-1]}")
