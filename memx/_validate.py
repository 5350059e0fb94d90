"""Small helpers for config validation messages: name the field, the bad value, what is allowed."""

from typing import Any

from memx.errors import ConfigError


def require(cond: bool, owner: str, field: str, value: Any, allowed: str) -> None:
  if not cond:
    raise ConfigError(f"{owner}.{field} = {value!r} is not allowed: {allowed}.")


def one_of(owner: str, field: str, value: Any, options) -> None:
  require(value in options, owner, field, value, f"expected one of {sorted(map(str, options))}")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


_ABSENT = object()


def describe_differences(have: dict, want: dict, limit: int = 4) -> str:
  """The dotted keys whose values differ between two nested dicts (a stored config or
  identity, and the current one), "" if none. A key `have` lacks and that is None in `want` is
  a config field added since, left unset: it matches (old runs keep resuming)."""
  a, b = _flatten(have), _flatten(want)
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)
          and not (k not in a and b[k] is None)]
  show = lambda v: "absent" if v is _ABSENT else repr(v)  # noqa: E731
  more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(f"{k} = {show(a.get(k, _ABSENT))} there, {show(b.get(k, _ABSENT))} now"
                   for k in keys[:limit]) + more
