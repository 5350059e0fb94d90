"""Packed checkpoints of ternary models: 2-bit weights + scales in one .npz, and loading them
into the packed inference form.

`pack_model` swaps every BitLinear of a model for its PackedBitLinear (2-bit codes, 4 per byte,
plus an fp32 scale). `export_packed` writes that form — every remaining array (embeddings,
norms, lower bounds, packed codes, scales) under its module path — with the ModelConfig as JSON,
atomically (temp file + rename). `load_packed` rebuilds the packed model for a config and fills
it; a file written for another config, or whose arrays do not fit, raises
CheckpointMismatchError naming what differs.

The file always holds the codes as bytes, uint8 [⌈in/4⌉, out]. A loaded layer serves them as
int32 words where out is a multiple of 4 (`memx.nn.bitlinear.serving_layout`); both directions
are numpy views of the same little-endian bytes, not conversions.
"""

import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx.errors import CheckpointCorruptError, CheckpointMismatchError, ConfigError
from memx.models.config import ModelConfig, SSMConfig
from memx.models.transformer import TransformerLM
from memx.nn.bitlinear import BitLinear, pack_bitlinears

FORMAT = "memx-packed-ternary-v1"
_META = ("__format__", "__config__")
_CODES = "['packed']"  # the key suffix of a PackedBitLinear's codes


def _file_layout(key: str, a: np.ndarray) -> np.ndarray:
  """Codes held as int32 words → their bytes, uint8 [kp, 4·cols] (a view)."""
  if key.endswith(_CODES) and a.dtype == np.int32:
    return np.ascontiguousarray(a, "<i4").view(np.uint8)
  return a


def _model_layout(key: str, a: np.ndarray, want) -> np.ndarray:
  """File bytes → the int32 words the model holds, where it holds words (a view); numpy's
  untyped records of the dtypes it lacks (bfloat16 is saved as raw 2-byte '|V2') → that
  dtype."""
  want_dtype = np.dtype(want.dtype)
  if a.dtype.kind == "V" and want_dtype.kind == "V" and a.dtype.itemsize == want_dtype.itemsize:
    return a.view(want_dtype)
  if key.endswith(_CODES) and a.dtype == np.uint8 and want.dtype == jnp.int32 and a.ndim == 2 \
      and a.shape[1] % 4 == 0:
    return np.ascontiguousarray(a).view("<i4").astype(np.int32, copy=False)
  return a


def _check_packable(cfg: ModelConfig) -> None:
  if not cfg.uses_bitlinear or not cfg.ternary:
    raise ConfigError(
        f"model.ternary = {cfg.ternary!r}, model.mixers = {cfg.mixers!r}, model.mlp_kind = "
        f"{cfg.mlp_kind!r} is not allowed for a packed checkpoint: it needs BitLinear layers "
        f"(mlgru mixers or a bitglu MLP) with model.ternary = True.")


def pack_model(model: TransformerLM, *, implementation=None) -> TransformerLM:
  """Turns `model` into its packed inference form in place (and returns it)."""
  _check_packable(model.cfg)
  pack_bitlinears(model, implementation=implementation)
  return model


def _has_bitlinear(model) -> bool:
  return any(isinstance(m, BitLinear) for _, m in model.iter_modules())


def config_to_json(cfg: ModelConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
  d = json.loads(text)
  d["ssm"] = SSMConfig(**d["ssm"])
  return ModelConfig(**d)  # (it turns JSON lists into tuples)


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): leaf for p, leaf in leaves}


def export_packed(model: TransformerLM, path: str | os.PathLike) -> int:
  """Writes the packed form of `model` (packing a copy if it still has latent weights) to
  `path` (.npz). Returns the bytes of the arrays written (2-bit codes, scales, everything else).
  """
  _check_packable(model.cfg)
  if _has_bitlinear(model):
    model = pack_model(nnx.clone(model))
  arrays = {k: _file_layout(k, np.asarray(v))
            for k, v in _flat(nnx.to_pure_dict(nnx.state(model))).items()}
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, __format__=np.asarray(FORMAT), __config__=np.asarray(config_to_json(model.cfg)),
               **arrays)
    os.replace(tmp, path)  # readers never see a half-written file
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return sum(a.nbytes for a in arrays.values())


def _config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
  return [f"{f.name}: file {getattr(a, f.name)!r} vs requested {getattr(b, f.name)!r}"
          for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)]


def load_packed(path: str | os.PathLike, cfg: ModelConfig | None = None, *,
                implementation=None) -> TransformerLM:
  """The packed inference model stored at `path`.

  cfg: the config the caller expects (default: the one stored in the file). A mismatch raises
  CheckpointMismatchError naming the differing fields; arrays that do not fit the packed
  model's structure (missing, extra, other shapes or dtypes) raise it too.
  implementation: passed to every packed matmul (None = dispatch by backend).
  """
  try:
    with np.load(os.fspath(path), allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise CheckpointCorruptError(f"load_packed: cannot read {os.fspath(path)!r}: {e}") from e
  if str(data.get("__format__", "")) != FORMAT:
    raise CheckpointCorruptError(f"load_packed: {os.fspath(path)!r} is not a {FORMAT} file")
  stored = config_from_json(str(data["__config__"]))
  if cfg is None:
    cfg = stored
  elif cfg != stored:
    raise CheckpointMismatchError(
        f"load_packed: {os.fspath(path)!r} holds a model for another config; differing fields: "
        + "; ".join(_config_diff(stored, cfg)))
  _check_packable(cfg)

  def build():
    return pack_model(TransformerLM(cfg, rngs=nnx.Rngs(0)), implementation=implementation)

  model = nnx.eval_shape(build)  # structure only: no weights are initialised or quantized
  template = nnx.to_pure_dict(nnx.state(model))
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  arrays = {k: v for k, v in data.items() if k not in _META}
  for key, codes in arrays.items():
    # Each byte holds four 2-bit codes 0, 1, 2 (weights -1, 0, +1); 3 would decode as +2.
    if key.endswith(_CODES) and codes.dtype == np.uint8 and any(
        ((codes >> (2 * i)) & 3 == 3).any() for i in range(4)):
      raise CheckpointCorruptError(f"load_packed: {os.fspath(path)!r}: {key} holds 2-bit code 3, "
                                   "which no ternary weight packs to: the file is corrupt")
  problems, leaves = [], []
  for p, want in paths:
    key = jax.tree_util.keystr(p)
    got = arrays.pop(key, None)
    if got is not None:
      got = _model_layout(key, got, want)
    if got is None:
      problems.append(f"missing {key}")
    elif got.shape != want.shape or got.dtype != want.dtype:
      problems.append(f"{key}: file {got.dtype}{list(got.shape)} vs model "
                      f"{want.dtype}{list(want.shape)}")
    leaves.append(got)
  problems += [f"unexpected {k}" for k in arrays]
  if problems:
    raise CheckpointMismatchError("load_packed: the arrays do not fit the packed model: "
                                  + "; ".join(problems[:8])
                                  + (f" (and {len(problems) - 8} more)" if len(problems) > 8
                                     else ""))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(x) for x in leaves]))
  nnx.update(model, state)
  return model
