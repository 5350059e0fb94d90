"""Config: one frozen tree of the component configs that fully describes a run."""

import dataclasses
import hashlib
import json
import logging
import typing
from typing import Any

from memx.checkpoint.config import CheckpointConfig
from memx.data.config import DataConfig
from memx.models.config import ModelConfig
from memx.parallel.config import ParallelConfig
from memx.train.config import (
  LORA_TARGETS,
  FinetuneConfig,
  LocalConfig,
  OptimConfig,
  TeacherConfig,
  TrainConfig,
)

__all__ = ["CheckpointConfig", "Config", "DataConfig", "FinetuneConfig", "LocalConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "TeacherConfig", "TrainConfig",
           "config_hash", "to_dict"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  parallel: ParallelConfig = ParallelConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  local: LocalConfig = LocalConfig()
  teacher: TeacherConfig = TeacherConfig()


def to_dict(cfg: Any) -> dict:
  """The config as plain data; an int given for a float field is written as that float, so
  configs that compare equal (lr=1 and lr=1.0) also hash equal."""
  out = dataclasses.asdict(cfg)
  _floats_as_floats(type(cfg), out)
  return out


def _floats_as_floats(cls, d: dict) -> None:
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    v, hint = d.get(f.name), hints.get(f.name)
    if isinstance(v, dict) and dataclasses.is_dataclass(f.default):
      _floats_as_floats(type(f.default), v)
    elif isinstance(v, int) and not isinstance(v, bool) and (
        hint is float or float in typing.get_args(hint)) and int not in typing.get_args(hint):
      d[f.name] = float(v)


# Fields added after runs existed, with the value that keeps the behaviour runs had before:
# at that value a field is left out of config_hash, so adding it renamed no run and made no
# sweep retrain a finished entry. Any other value is hashed, as is every field not listed.
HASH_NEUTRAL = {("train", "microbatches"): 1, ("optim", "name"): "adamw",
                ("optim", "mu_dtype"): None, ("optim", "galore_rank"): 128,
                ("optim", "galore_every"): 200, ("optim", "galore_scale"): 0.25,
                ("optim", "frugal_free_scale"): 1.0,
                ("optim", "apollo_rank"): 256, ("optim", "apollo_every"): 200,
                ("optim", "apollo_scale"): None, ("optim", "estimator"): "backprop",
                ("optim", "moment_quant"): None,
                ("optim", "mezo_eps"): 1e-3, ("optim", "mezo_sparsity"): 0.0,
                ("finetune", "base"): None,
                ("finetune", "base_step"): None, ("finetune", "lora_rank"): 0,
                ("finetune", "lora_alpha"): 16.0,
                ("finetune", "lora_targets"): LORA_TARGETS,
                ("finetune", "quantize_base"): "none", ("model", "weight_quant"): None,
                ("local", "groups"): 1, ("local", "aux_depth"): 1, ("local", "aux_decay"): True,
                ("local", "aux_weights"): "own", ("local", "ema_decay"): 0.99,
                ("teacher", "run"): None, ("teacher", "step"): None, ("teacher", "weight"): 0.5,
                ("teacher", "temperature"): 1.0, ("teacher", "divergence"): "forward_kl",
                ("teacher", "on_policy"): 0.0, ("teacher", "prompt_len"): 0,
                ("teacher", "sample_temperature"): 1.0}


def drop_neutral(d: dict, neutral: dict) -> dict:
  """d (a to_dict result, changed in place and returned) without the `neutral` {(dotted path
  parts): value} entries that hold their neutral value."""
  for *parents, name in neutral:
    owner = d
    for key in parents:
      owner = owner.get(key) if isinstance(owner, dict) else None
    if isinstance(owner, dict) and name in owner and owner[name] == neutral[(*parents, name)]:
      del owner[name]
      if parents and not owner:  # a section added since, all neutral: as if absent
        _drop_path(d, parents)
  return d


def _drop_path(d: dict, parents: list) -> None:
  for key in parents[:-1]:
    d = d[key]
  del d[parents[-1]]


def config_hash(cfg: Any) -> str:
  """Short stable hash of a config (names run directories and sweep index rows)."""
  blob = json.dumps(drop_neutral(to_dict(cfg), HASH_NEUTRAL), sort_keys=True,
                    default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:12]


def from_dict(d: dict) -> Config:
  """Inverse of to_dict (JSON lists become tuples). Fields missing from `d` take their defaults
  (a config written before they existed); keys that are no field are ignored with a warning
  (a field since removed, or a hand edit's typo)."""
  def build(cls, values, where=""):
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      logging.getLogger(__name__).warning(
          "config keys %s are not fields of this memx's config; ignored",
          ", ".join(where + k for k in unknown))
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name not in values:
        continue
      v = values[f.name]
      if dataclasses.is_dataclass(f.default):
        v = build(type(f.default), v, f"{where}{f.name}.")
      elif isinstance(v, list):
        v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
      kwargs[f.name] = v
    return cls(**kwargs)
  return build(Config, d)
