"""Small helpers for config validation messages: name the field, the bad value, what is allowed."""

import functools
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


@functools.cache
def _field_defaults() -> dict:
  """Every config field's default by dotted path ("data.document_mask": False, ...), as a
  stored config.json holds it (tuples as lists), the form the configs it is compared with
  have."""
  import json

  from memx.config import Config, to_dict  # (memx.config imports this module)
  return _flatten(json.loads(json.dumps(to_dict(Config()), default=str)))


def _added_since(key: str, value: Any, defaults: dict) -> bool:
  """Whether `key` (absent from a stored config) is a field added since, at its default: None,
  or the default of the config field its path ends with. Fields are added with defaults that
  keep the old behaviour, so such a run behaved as the default does."""
  if value is None:
    return True
  parts = key.split(".")
  return any(defaults.get(".".join(parts[i:]), _ABSENT) == value for i in range(len(parts)))


def describe_differences(have: dict, want: dict, limit: int = 4) -> str:
  """The dotted keys whose values differ between two nested dicts (a stored config or
  identity, and the current one), "" if none. A key `have` lacks whose value in `want` is None
  or its field's default is a config field added since, left at its default: it matches (old
  runs keep resuming)."""
  a, b = _flatten(have), _flatten(want)
  defaults = _field_defaults()
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)
          and not (k not in a and _added_since(k, b[k], defaults))]
  show = lambda v: "absent" if v is _ABSENT else repr(v)  # noqa: E731
  more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(f"{k} = {show(a.get(k, _ABSENT))} there, {show(b.get(k, _ABSENT))} now"
                   for k in keys[:limit]) + more
