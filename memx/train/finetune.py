"""The model a run trains, per `FinetuneConfig`: from its initialization or a trained base run's
weights, whole or through LoRA / QLoRA adapters (memx.nn.lora).

A fine-tuning run is an ordinary run (same loop, checkpoints, resume, evaluation, sweeps). Its
train state is (model, optimizer) as always; with adapters the model holds each adapted weight
as a LoRAWeight (frozen base, or NF4 codes, plus A and B), and the optimizer, the gradient and
the optimizer state cover the adapters only (`trainable`). Checkpoints keep the whole model,
base included, so a fine-tuned run restores, resumes and evaluates (memx.train.restore) without
its base run; `merge_lora` gives the plain model.

A base that is itself a LoRA run is merged before its weights are copied, so fine-tunes chain.
"""

import dataclasses
import hashlib
import json
import math

import jax
from flax import nnx

from memx.config import Config, config_hash
from memx.errors import ConfigError
from memx.models.transformer import TransformerLM
from memx.nn.lora import add_lora, merge_lora
from memx.nn.quantized import Quantized
from memx.train import local

# The adapters' initialization draws from its own stream of the model key.
ADAPTER_STREAM = 0x4C6F5241


def param_count(model: TransformerLM) -> int:
  """Parameters of a model: every nnx.Param entry (but local learning's training-only
  auxiliary networks), and each quantized weight counted as the weights it stores (not its
  code bytes)."""
  from memx.nn.quantized import IntQWeight, NF4Weight

  n = sum(x.size for x in jax.tree.leaves(nnx.state(
      model, nnx.All(nnx.Param, lambda path, _: path[0] != local.AUX))))
  return int(n + sum(math.prod(m.shape) for _, m in nnx.iter_graph(model)
                     if isinstance(m, IntQWeight | NF4Weight)))


def trainable(cfg: Config):
  """The nnx filter of the variables that train: the adapters, or every parameter."""
  return nnx.LoRAParam if cfg.finetune.lora_rank else nnx.Param


def build_model(cfg: Config, model_key: jax.Array, *, load_base: bool = True) -> TransformerLM:
  """The run's model: initialized from model_key; finetune.base's weights copied in (unless
  load_base is False: shapes only, e.g. under nnx.eval_shape for a restore target); then
  adapters added for finetune.lora_rank >= 1.

  Raises ConfigError when the base run's parameters do not fit model.*, or when the model has
  nothing LoRA can adapt or a weight NF4 cannot quantize."""
  model = TransformerLM(cfg.model, rngs=nnx.Rngs(params=model_key))
  if cfg.model.weight_quant is not None:  # a quantized model's frozen projections
    from memx.quant.config import WeightQuant
    from memx.quant.model import apply_structure
    try:
      apply_structure(model, WeightQuant.parse(cfg.model.weight_quant))
    except ValueError as e:
      raise ConfigError(f"model.weight_quant = {cfg.model.weight_quant!r} is not allowed for "
                        f"this model: {e}") from None
  ft = cfg.finetune
  if ft.base is not None and load_base:
    copy_base(model, ft)
  # local learning's auxiliary networks (local.groups > 1): after the base's weights, which
  # MAN's moving averages start from
  local.add_aux(model, cfg, model_key)
  if ft.lora_rank:
    try:
      add_lora(model, rank=ft.lora_rank, alpha=ft.lora_alpha, targets=ft.lora_targets,
               quantize_base=ft.quantize_base == "nf4",
               rngs=nnx.Rngs(params=jax.random.fold_in(model_key, ADAPTER_STREAM)))
    except ValueError as e:
      raise ConfigError(f"finetune.lora_rank = {ft.lora_rank} (quantize_base = "
                        f"{ft.quantize_base!r}) is not allowed for this model: {e}") from None
  return model


def copy_base(model: TransformerLM, ft) -> None:
  """Replaces model's parameters by those of the trained run ft.base at ft.base_step (merging
  its adapters if it is itself a LoRA run)."""
  # (restore builds states through this module)
  from memx.train.restore import find_run_dir, load_config, load_trained

  base = ft.base
  run_dir = find_run_dir(base)
  _check_base_checkpoint(run_dir, load_config(run_dir), ft)
  trained = load_trained(base, step=ft.base_step)
  # parameters, and a quantized base's frozen codes; not local learning's auxiliary networks
  # (training-only: a base trained with them gives its model, a run training with them adds
  # its own after the copy)
  weights = nnx.All(nnx.Any(nnx.Param, Quantized), lambda path, _: path[0] != local.AUX)
  source = nnx.state(merge_lora(trained.model), weights)
  target = nnx.state(model, weights)
  _check_fits(source, target, base)
  nnx.update(model, jax.tree.map(lambda s, t: s.astype(t.dtype), source, target))


def check(cfg: Config, *, base_run: bool = True) -> None:
  """Everything finetune.* can get wrong, before anything is trained or written: a base that
  is no run, has not finished (or lacks finetune.base_step) or whose parameters do not fit
  model.*; adapters the model cannot take. Shapes only: no weights are loaded. base_run=False
  skips the base run (a resume restores the whole model from its own checkpoint)."""
  ft = cfg.finetune
  if cfg.model.weight_quant is not None and not (ft.lora_rank and ft.base is not None):
    raise ConfigError(
        f"model.weight_quant = {cfg.model.weight_quant!r} is not allowed without "
        "finetune.base and finetune.lora_rank >= 1: quantized projections are frozen, so only "
        "adapters on a quantized run (memx quantize) can train them.")
  if cfg.model.weight_quant is not None and ft.quantize_base != "none":
    raise ConfigError(
        f"finetune.quantize_base = {ft.quantize_base!r} is not allowed with model.weight_quant "
        f"= {cfg.model.weight_quant!r}: the projections are quantized already.")
  if ft.base is not None and base_run:
    from memx.train.restore import find_run_dir, load_config

    run_dir = find_run_dir(ft.base)
    base_cfg = load_config(run_dir)
    _check_base_checkpoint(run_dir, base_cfg, ft)
    check_against(cfg, base_cfg)
  elif ft.lora_rank:
    nnx.eval_shape(lambda: build_model(cfg, jax.random.key(0), load_base=False))


def check_against(cfg: Config, base_cfg: Config) -> None:
  """The shape checks of `check` against the base's config (a sweep entry's base may not have
  trained yet)."""
  base_model = base_cfg.model
  # A LoRA run over a quantized model is merged into plain weights when it becomes a base.
  stored = None if base_cfg.finetune.lora_rank else base_model.weight_quant
  if stored != cfg.model.weight_quant:
    raise ConfigError(f"finetune.base = {cfg.finetune.base!r} gives its projections as "
                      f"model.weight_quant = {stored!r}; set model.weight_quant to that (it is "
                      f"{cfg.model.weight_quant!r}).")
  shapes = lambda m: nnx.state(nnx.eval_shape(  # noqa: E731
      lambda: TransformerLM(m, rngs=nnx.Rngs(params=jax.random.key(0)))), nnx.Param)
  _check_fits(shapes(base_model), shapes(cfg.model), cfg.finetune.base)
  if cfg.finetune.lora_rank:
    nnx.eval_shape(lambda: build_model(cfg, jax.random.key(0), load_base=False))


def _check_base_checkpoint(run_dir, base_cfg: Config, ft) -> None:
  check_run_checkpoint(run_dir, base_cfg, ft.base, ft.base_step, "finetune.base",
                       "finetune.base_step", "fine-tuned")


def check_run_checkpoint(run_dir, run_cfg: Config, path: str, step: int | None, field: str,
                         step_field: str, use: str) -> None:
  """The trained run at `path` (a base, a teacher) has the checkpoint to start from: `step`
  among its complete steps, or (step None) a finished training (summary.json, status "done"),
  whose newest checkpoint is its final one. A half-trained or failed run is refused, not
  used; field / step_field / use name the setting in the errors."""
  from memx.checkpoint import Checkpointer

  if step is None:
    try:
      status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
      status = None
    if status != "done":
      raise ConfigError(
          f"{field} = {path!r} has not finished training (summary.json "
          f"{'status ' + repr(status) if status else 'missing'}): let it finish, or name the "
          f"checkpoint to start from with {step_field}. A half-trained run is not {use}.")
    return
  ckpt_dir = run_dir / "checkpoints"
  steps = []
  if ckpt_dir.is_dir():
    ckpt = Checkpointer(ckpt_dir, run_cfg.checkpoint)
    try:
      steps = ckpt.complete_steps()
    finally:
      ckpt.close()
  if step not in steps:
    raise ConfigError(f"{step_field} = {step} is not allowed: {path!r} has complete "
                      f"checkpoints at steps {steps or 'none'}.")


def _check_fits(source, target, base: str) -> None:
  shapes = lambda s: {jax.tree_util.keystr(p): tuple(x.shape)  # noqa: E731
                      for p, x in jax.tree_util.tree_flatten_with_path(s)[0]}
  have, want = shapes(source), shapes(target)
  if have != want:
    diff = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    shown = ", ".join(f"{k}: base {have.get(k)} vs model {want.get(k)}" for k in diff[:4])
    raise ConfigError(f"finetune.base = {base!r} does not fit model.*: its parameters differ "
                      f"({len(diff)} arrays; {shown}). Give model.* the base run's "
                      f"architecture (its config.json).")


def base_hash(base: str) -> str:
  """What names the base run's training: the config hash its provenance.json records (itself
  combined with its own base's for a fine-tune) and its data hash; else its config.json's
  hash."""
  from memx.train.restore import find_run_dir, load_config

  run_dir = find_run_dir(base)
  try:
    prov = json.loads((run_dir / "provenance.json").read_text())
  except (OSError, ValueError):
    prov = {}
  recorded = prov.get("config_hash") if isinstance(prov, dict) else None
  if not isinstance(recorded, str):
    return config_hash(load_config(run_dir))
  return f"{recorded}/{prov.get('data_hash')}"


def run_hash(cfg: Config, base: str | None = None, teacher: str | None = None) -> str:
  """The hash that names a run's training (sweep indexes, provenance.json): config_hash, and for
  a fine-tune its config without the base's path combined with the base's own identity
  (`base`, else read from the base run: its hash and data hash); likewise for a run distilled
  from a teacher run (teacher.run; `teacher` its identity). A base or teacher trained again on
  other data or with another config makes the runs built on it stale; a moved or differently
  spelt workdir does not."""
  if cfg.finetune.base is None and cfg.teacher.run is None:
    return config_hash(cfg)
  unplaced, key = cfg, ""
  if cfg.finetune.base is not None:
    unplaced = dataclasses.replace(unplaced, finetune=dataclasses.replace(cfg.finetune,
                                                                          base="<base>"))
    key += f":{base if base is not None else base_hash(cfg.finetune.base)}"
  if cfg.teacher.run is not None:
    unplaced = dataclasses.replace(unplaced, teacher=dataclasses.replace(cfg.teacher,
                                                                         run="<teacher>"))
    key += f":teacher={teacher if teacher is not None else base_hash(cfg.teacher.run)}"
  return hashlib.sha256(f"{config_hash(unplaced)}{key}".encode()).hexdigest()[:12]


def base_entry(overrides: dict, key: str = "finetune.base") -> str | None:
  """The sweep entry a sweep entry fine-tunes ("finetune.base": "@NAME"), or with key
  "teacher.run" the one it distils ("teacher.run": "@NAME"); else None."""
  base = overrides.get(key)
  return base[1:] if isinstance(base, str) and base.startswith("@") else None
