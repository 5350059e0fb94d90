"""Typed dotted overrides (`--set model.d_model=256`) on nested frozen config dataclasses."""

import ast
import dataclasses
import difflib
import types
import typing
from typing import Any

from memx.errors import ConfigError

_NONE = ("none", "null")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
  """Every dotted leaf key of a config tree."""
  keys = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      keys += all_keys(value, f"{prefix}{f.name}.")
    else:
      keys.append(prefix + f.name)
  return keys


def parse_assignments(items: list[str]) -> dict[str, str]:
  """["a.b=1", ...] → {"a.b": "1"}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {item!r} is not of the form key=value "
                        "(for example --set optim.lr=3e-4).")
    out[key.strip()] = value.strip()
  return out


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
  """Returns a new config with each dotted key set; values may be strings (parsed by type).

  All keys are applied before any dataclass validates, so fields that must change together
  (data.source with data.paths, parallel.mesh_shape with mesh_axes) work in any order.
  """
  valid = all_keys(cfg)
  for key in overrides:
    if key not in valid:
      raise ConfigError(f"unknown config key {key!r}; {_hint(key, valid)}")
  return _set_many(cfg, {tuple(k.split(".")): v for k, v in overrides.items()}, "")


def check_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> None:
  """Raises ConfigError for an unknown key or a value of the wrong type, without applying them.

  For overrides whose target is not known yet (a distillation's data is the teacher run's, read
  only once that run exists): `cfg` is any instance of the target's type.
  """
  valid = all_keys(cfg)
  for key, value in overrides.items():
    if key not in valid:
      raise ConfigError(f"unknown config key {prefix + key!r}; {_hint(key, valid)}"
                        + (f" (keys under {prefix!r})" if prefix else ""))
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
      node = getattr(node, part)
    coerce(value, typing.get_type_hints(type(node))[leaf], prefix + key)


# Names other frameworks give memx's keys (optax, MaxText, levanter): suggested first.
_ALIASES = {"learning_rate": "lr", "optimizer": "name", "opt": "name",
            "gradient_accumulation_steps": "microbatches", "grad_accum": "microbatches"}


def _hint(key: str, valid: list[str]) -> str:
  owner, _, leaf = key.rpartition(".")
  alias = [k for k in valid if k.rpartition(".") == (owner or k.rpartition(".")[0], ".",
                                                       _ALIASES.get(leaf))]
  same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
  near = alias or same_leaf or difflib.get_close_matches(key, valid, n=4, cutoff=0.5)
  if near:
    return f"did you mean {', '.join(near)}?"
  section = key.split(".")[0]
  same_section = [k for k in valid if k.startswith(section + ".")]
  if same_section:
    return f"valid keys in {section!r}: {', '.join(same_section)}"
  return f"valid sections: {', '.join(sorted({k.split('.')[0] for k in valid}))}"


def _set_many(node: Any, changes: dict[tuple[str, ...], Any], prefix: str) -> Any:
  hints = typing.get_type_hints(type(node))
  fields = {}
  for name in {parts[0] for parts in changes}:
    here = {parts[1:]: v for parts, v in changes.items() if parts[0] == name}
    if () in here:
      fields[name] = coerce(here[()], hints[name], prefix + name)
    else:
      fields[name] = _set_many(getattr(node, name), here, f"{prefix}{name}.")
  return dataclasses.replace(node, **fields)


def describe(tp: Any) -> str:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(describe(a) for a in args)
  if origin is typing.Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin is tuple:
    return f"a tuple of {describe(args[0])}" + ("s" if len(args) == 2 else "")
  return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
  """Converts `value` (a string from the command line, or a Python value) to type `tp`."""
  try:
    return _coerce(value, tp)
  except (ValueError, TypeError, SyntaxError):
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {describe(tp)}.") from None


def _coerce(value: Any, tp: Any) -> Any:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if type(None) in args and (value is None or str(value).lower() in _NONE):
      return None
    for arm in args:
      if arm is type(None):
        continue
      try:
        return _coerce(value, arm)
      except (ValueError, TypeError, SyntaxError):
        pass
    raise ValueError(value)
  if origin is typing.Literal:
    for a in args:
      if value == a or (isinstance(value, str) and str(a) == value):
        return a
    raise ValueError(value)
  if origin is tuple:
    if isinstance(value, str):
      text = value.strip()
      if not text or text in ("()", "[]"):
        value = ()
      elif text[0] in "([":
        value = ast.literal_eval(text)
      else:
        value = [v.strip() for v in text.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
      raise TypeError(value)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0]) for v in value)
    if len(args) != len(value):
      raise ValueError(value)
    return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
      return value.lower() in _TRUE
    raise TypeError(value)
  if tp is int:
    if isinstance(value, bool):
      raise TypeError(value)
    if isinstance(value, int):
      return value
    if isinstance(value, str):
      return int(value.replace("_", ""))
    raise TypeError(value)
  if tp is float:
    if isinstance(value, bool):
      raise TypeError(value)
    if isinstance(value, int | float):
      return float(value)
    if isinstance(value, str):
      return float(value)
    raise TypeError(value)
  if tp is str:
    if not isinstance(value, str):
      raise TypeError(value)
    text = value.strip()
    # A quoted literal spells what a shell argument cannot keep: '"\n\n"' is two newlines
    # (the command line's values are stripped of surrounding whitespace).
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
      return ast.literal_eval(text)
    return value
  raise TypeError(f"unsupported config type {tp}")
