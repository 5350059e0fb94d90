"""Loading experiment files: `path/to/exp.py[:variant]` → module → Config."""

import hashlib
import importlib.util
import pathlib
import sys
import types
from typing import Any

from memx.config import Config
from memx.errors import UserError
from memx.experiment.overrides import apply_overrides


def split_spec(spec: str) -> tuple[pathlib.Path, str | None]:
  """"exp.py:tiny" → (Path("exp.py"), "tiny"); "exp.py" → (Path("exp.py"), None)."""
  path, sep, variant = spec.rpartition(":")
  if sep and path and "/" not in variant:
    return pathlib.Path(path), variant or None
  return pathlib.Path(spec), None


def load_module(path: pathlib.Path) -> types.ModuleType:
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"experiment file {str(path)!r} does not exist. Pass the path of a Python "
                    "file that defines config(variant) -> Config, e.g. "
                    "experiments/demo/ablation.py.")
  name = "memx_experiment_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:  # not a .py file (e.g. a plan's JSON)
    raise UserError(f"experiment file {str(path)!r} is not a Python file (.py); pass the "
                    "experiment's .py file, e.g. experiments/demo/ablation.py.")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"experiment file {str(path)!r} has a syntax error: {e}") from None
  if not callable(getattr(module, "config", None)):
    raise UserError(f"experiment file {str(path)!r} defines no config(variant) function; "
                    "an experiment must define config(variant: str) -> memx.config.Config.")
  return module


def variants(module: types.ModuleType) -> tuple[str, ...]:
  known = getattr(module, "VARIANTS", ("base",))
  if not isinstance(known, tuple | list) or not known or not all(
      isinstance(v, str) and v for v in known):
    raise UserError(f"{module.__file__}: VARIANTS must be a non-empty tuple of variant names "
                    f"(strings); got {known!r}.")
  return tuple(known)


def build_config(module: types.ModuleType, variant: str | None,
                 overrides: dict[str, Any] | None = None) -> Config:
  known = variants(module)
  variant = variant or known[0]
  if variant not in known:
    raise UserError(f"unknown variant {variant!r} of {module.__file__}; "
                    f"valid variants: {', '.join(known)}.")
  cfg = module.config(variant)
  if not isinstance(cfg, Config):
    raise UserError(f"{module.__file__}: config({variant!r}) returned {type(cfg).__name__}, "
                    "not memx.config.Config.")
  return apply_overrides(cfg, overrides or {})


def sweep_entries(module: types.ModuleType) -> list[tuple[str, dict[str, Any]]]:
  fn = getattr(module, "sweep", None)
  if fn is None:
    raise UserError(f"{module.__file__} defines no sweep() function; memx sweep needs "
                    "sweep() -> list of (run name, {dotted key: value}).")
  entries = list(fn())
  for e in entries:
    if not (isinstance(e, tuple | list) and len(e) == 2 and isinstance(e[1], dict)):
      raise UserError(f"{module.__file__}: sweep() must return (run name, {{dotted key: "
                      f"value}}) pairs; got the entry {e!r}.")
  entries = [tuple(e) for e in entries]
  names = [n for n, _ in entries]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise UserError(f"{module.__file__}: sweep() names runs more than once: {', '.join(dupes)}.")
  for n in names:
    check_run_name(n, f"{module.__file__}: sweep() run name")
  return entries


def check_run_name(name, what: str = "run name") -> None:
  """A run's directory name: one plain path component inside the workdir. `..`, `.`, absolute
  paths and separators would put the run (and what --overwrite deletes) elsewhere."""
  if not isinstance(name, str) or not name or name.startswith(".") or "/" in name \
      or "\\" in name or "\0" in name:
    raise UserError(f"{what} {name!r} is not allowed: it must be a plain directory name (no "
                    "'/' or '\\', not starting with '.'), the run's directory inside --workdir.")
