"""Checks that a strategy splits every dimension it touches evenly, before anything compiles.

`validate_for_model` reads the usual fields of a model config by name (it never imports
memx.models: this package knows no models) and names the field a strategy would split
unevenly, or a sequence layout its recurrent layers cannot run on; `validate_arrays` checks
the `axes` metadata of any array tree exactly.
"""

from collections.abc import Mapping
from typing import Any

import jax

from memx.errors import ConfigError
from memx.parallel.axes import BATCH, EMBED, HEADS, KV_HEADS, MLP, SEQ, VOCAB
from memx.parallel.rules import RULES, mesh_axes_of, shards

# Token mixers that scan the sequence (memx.parallel.sequence_scan under sequence parallelism).
SCAN_MIXERS = ("mamba2", "linear_attention", "mlgru")


def _sizes(mesh, parallel_cfg) -> dict[str, int]:
  if mesh is None:
    return dict(zip(parallel_cfg.mesh_axes, parallel_cfg.resolved_shape(jax.device_count()),
                    strict=True))
  if isinstance(mesh, Mapping):
    return dict(mesh)
  return dict(mesh.shape)


def _model_dims(model_cfg: Any) -> list[tuple[str, int, str]]:
  """(logical axis, size, field) for every split-able dim of a memx ModelConfig."""
  g = lambda name, default=None: getattr(model_cfg, name, default)  # noqa: E731
  dims = []
  mixers = g("mixers") or ("attention",) * (g("n_layers") or 1)
  if "attention" in mixers or "linear_attention" in mixers:
    dims += [(HEADS, g("n_heads"), "model.n_heads"),
             (KV_HEADS, g("kv_heads", g("n_heads")), "model.n_kv_heads (None = n_heads)")]
  if "mamba2" in mixers:
    ssm = g("ssm")
    dims += [(HEADS, g("ssm_heads"), "model.ssm_heads (= ssm.expand * d_model / ssm.head_dim)"),
             (KV_HEADS, getattr(ssm, "n_groups", 1), "model.ssm.n_groups")]
  dims.append((EMBED, g("d_model"), "model.d_model"))
  if g("mlp", True):
    dims.append((MLP, g("ff_dim", g("d_ff")), "model.d_ff (resolved)"))
  if "mlgru" in mixers:  # its projections put d_model on the MLP axis
    dims.append((MLP, g("d_model"), "model.d_model (MLGRU width)"))
  dims.append((VOCAB, g("vocab_size"), "model.vocab_size"))
  return [d for d in dims if d[1] is not None]


def validate_for_model(parallel_cfg, model_cfg, mesh=None, *, batch_size: int | None = None,
                       seq_len: int | None = None) -> None:
  """ConfigError naming the first dimension the strategy would split unevenly.

  Args:
    parallel_cfg: a ParallelConfig (its strategy and, without `mesh`, its mesh shape).
    model_cfg: a ModelConfig (read by field name: n_heads, kv_heads, d_model, ff_dim, ...).
    mesh: a Mesh, or a {axis: size} mapping; default parallel_cfg resolved on all devices.
    batch_size, seq_len: also check the global batch over the batch axes and the sequence
      over "seq" (twice the seq size for the zigzag layout, whose chunks are half shards).
  """
  sizes = _sizes(mesh, parallel_cfg)
  strategy = parallel_cfg.strategy
  table = dict(RULES[strategy])
  checks = _model_dims(model_cfg)
  if batch_size is not None:
    checks.append((BATCH, batch_size, "train.batch_size"))
  if seq_len is not None:
    checks.append((SEQ, seq_len, "data.seq_len"))
  for name, size, field in checks:
    entry = table.get(name)
    n = shards(entry, sizes)
    if name == SEQ and parallel_cfg.layout == "zigzag" and n > 1:
      n *= 2
    if n > 1 and size % n:
      axes = mesh_axes_of(entry)
      what = " x ".join(f"{a}={sizes.get(a, 1)}" for a in axes)
      extra = " (x2: the zigzag layout cuts each shard in two chunks)" if name == SEQ and (
          parallel_cfg.layout == "zigzag") else ""
      raise ConfigError(
          f"{field} = {size} is not allowed with parallel.strategy = {strategy!r}: it splits "
          f"the {name!r} dimension over mesh axes {what}{extra}, so it must be a multiple of "
          f"{n}. Change {field}, the mesh shape, or the strategy.")
  n_seq = shards(table.get(SEQ), sizes)
  _check_scan_layers(parallel_cfg, model_cfg, n_seq, seq_len)
  _check_sequence_attention(parallel_cfg, model_cfg, n_seq, shards(table.get(HEADS), sizes),
                            shards(table.get(KV_HEADS), sizes))


def _check_sequence_attention(parallel_cfg, model_cfg, n: int, heads_split: int,
                              kv_split: int) -> None:
  """Attention under sequence parallelism: what ring and all-to-all attention accept, checked
  before compiling (all-to-all gives each device a slice of its local heads)."""
  mixers = getattr(model_cfg, "mixers", None) or ("attention",)
  n_heads = getattr(model_cfg, "n_heads", None)
  if n <= 1 or "attention" not in mixers or n_heads is None:
    return
  if getattr(model_cfg, "attn_plan", None) is not None:
    raise ConfigError(
        f"model.attn_plan (per-head sparse plans) is not allowed with parallel.strategy = "
        f"{parallel_cfg.strategy!r}: sequence-parallel attention takes one mask for every head. "
        "Apply the plan without sequence parallelism.")
  if parallel_cfg.sequence_method != "all_to_all":
    return
  h = n_heads // max(heads_split, 1)
  g = max(getattr(model_cfg, "kv_heads", n_heads) // max(kv_split, 1), 1)
  if h % n or (g % n and n % g):
    raise ConfigError(
        f"parallel.sequence_method = 'all_to_all' is not allowed here: each device's {h} query "
        f"heads must split over the {n} devices of 'seq', and its {g} kv heads and {n} devices "
        f"must divide one into the other (model.n_heads = {n_heads}, over the tensor axis). "
        "Use sequence_method = 'ring', or fewer devices on 'seq'.")


def _check_scan_layers(parallel_cfg, model_cfg, n: int, seq_len: int | None) -> None:
  """Recurrent mixers under sequence parallelism: each device must hold runs of consecutive
  tokens ("contiguous" or "zigzag", not "striped"), long enough for Mamba-2's conv halo."""
  mixers = getattr(model_cfg, "mixers", None) or ()
  scans = [m for m in SCAN_MIXERS if m in mixers]
  if n <= 1 or not scans:
    return
  layout = parallel_cfg.layout
  if layout == "striped":
    raise ConfigError(
        f"parallel.sequence_layout = 'striped' is not allowed with model.mixers containing "
        f"{', '.join(scans)} under parallel.strategy = {parallel_cfg.strategy!r}: striped "
        f"shards hold every {n}-th token, so a recurrence would pass a state per token between "
        f"devices. Use 'zigzag' (balanced causal attention, two runs per device) or "
        f"'contiguous'.")
  if "mamba2" in scans and seq_len is not None:
    runs = 2 * n if layout == "zigzag" else n
    need = model_cfg.ssm.conv_width - 1
    if seq_len // runs < need:
      raise ConfigError(
          f"data.seq_len = {seq_len} is not allowed with parallel.strategy = "
          f"{parallel_cfg.strategy!r} and layout {layout!r}: each device holds runs of "
          f"{seq_len // runs} tokens, but Mamba-2's conv (model.ssm.conv_width = "
          f"{model_cfg.ssm.conv_width}) takes the {need} tokens before a run from one "
          f"neighbour. Use seq_len >= {need * runs} or fewer devices on 'seq'.")


def validate_arrays(tree, mesh, strategy: str) -> None:
  """ConfigError for any nnx.Variable whose `axes` metadata the rules would split unevenly."""
  from flax import nnx  # only here: the rest of this package needs no Flax

  sizes, table = _sizes(mesh, None), dict(RULES[strategy])
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for path, var in leaves:
    if not isinstance(var, nnx.Variable):
      continue
    axes = var.get_metadata().get("axes")
    if axes is None:
      continue
    for dim, (name, size) in enumerate(zip(axes, var.shape, strict=True)):
      n = shards(table.get(name), sizes)
      if n > 1 and size % n:
        raise ConfigError(
            f"parameter {jax.tree_util.keystr(path)} dim {dim} ({name!r}, size {size}) is not "
            f"a multiple of the {n} shards strategy {strategy!r} splits it into on mesh "
            f"{sizes}.")
