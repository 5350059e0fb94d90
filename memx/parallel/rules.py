"""Logical → mesh axis rule tables, one per ParallelConfig.strategy.

A strategy name joins components with "_": "dp" (batch over "data"), "fsdp" (ZeRO-3: every
parameter, gradient and optimizer moment split along its EMBED dim over "fsdp"; the batch over
"data" and "fsdp"), "tp" (Megatron: attention heads, MLP hidden units and the vocabulary over
"tensor") and "sp" (sequence parallel: activations split along SEQ over "seq"). Data
parallelism over "data" is part of every strategy, so "tp" and "dp_tp" are the same table.

Axes not named in a table are replicated. Each logical name appears at most once per table, so
`dict(RULES[s])` is the whole mapping. Resolving a tuple of logical names to a PartitionSpec
(`logical_to_spec`) never uses one mesh axis twice: activations such as [B, T, D] under "fsdp"
keep D whole because BATCH already took "fsdp" (MaxText's activation/parameter split, without
a second set of names).
"""

from collections.abc import Mapping, Sequence

from memx.parallel.axes import BATCH, EMBED, HEADS, KV_HEADS, MLP, SEQ, VOCAB

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Mesh axis names. Only this package and configs name them; model code never does.
DATA, FSDP, SEQ_AXIS, TENSOR = "data", "fsdp", "seq", "tensor"

# Components in the order their names appear in a strategy ("fsdp_sp_tp", never "tp_fsdp").
COMPONENTS = ("dp", "fsdp", "sp", "tp")


def _table(fsdp: bool, sp: bool, tp: bool) -> Rules:
  rules: list = [(BATCH, (DATA, FSDP) if fsdp else DATA)]
  if sp:
    rules.append((SEQ, SEQ_AXIS))
  if fsdp:
    rules.append((EMBED, FSDP))
  if tp:
    rules += [(HEADS, TENSOR), (KV_HEADS, TENSOR), (MLP, TENSOR), (VOCAB, TENSOR)]
  return tuple(rules)


def _build() -> tuple[dict[str, Rules], dict[str, tuple[str, ...]]]:
  rules, required = {}, {}
  for fsdp in (False, True):
    for sp in (False, True):
      for tp in (False, True):
        parts = [p for p, on in (("fsdp", fsdp), ("sp", sp), ("tp", tp)) if on]
        axes = (DATA,) + tuple(a for a, on in ((FSDP, fsdp), (SEQ_AXIS, sp), (TENSOR, tp)) if on)
        names = ["_".join(parts)] if parts else []
        if not fsdp:
          names.append("_".join(["dp", *parts]))  # "dp_tp" == "tp": data parallel is implied
        for name in names:
          rules[name] = _table(fsdp, sp, tp)
          required[name] = axes
  return rules, required


RULES: dict[str, Rules]
REQUIRED_AXES: dict[str, tuple[str, ...]]
RULES, REQUIRED_AXES = _build()
STRATEGIES: tuple[str, ...] = tuple(sorted(RULES, key=lambda s: (len(s.split("_")), s)))


def mesh_axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules,
                    mesh_shape: Mapping[str, int] | None = None):
  """PartitionSpec for an array whose dims carry the logical names `axes`.

  The first rule for a name wins; a mesh axis already used by an earlier dim of the same array
  is dropped (an array cannot be split twice over one axis). With `mesh_shape`, mesh axes the
  mesh lacks are dropped too, so one table serves meshes with and without, say, "tensor".
  Returns a jax.sharding.PartitionSpec.
  """
  # Imported here: the tables are plain data that ParallelConfig (a config leaf) reads.
  from jax.sharding import PartitionSpec

  if axes is None:
    return PartitionSpec()
  table: dict[str, tuple[str, ...]] = {}
  for name, entry in rules:
    table.setdefault(name, mesh_axes_of(entry))
  used: set[str] = set()
  out = []
  for name in axes:
    keep = tuple(a for a in table.get(name, ()) if a not in used
                 and (mesh_shape is None or a in mesh_shape))
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return PartitionSpec(*out)


def shards(entry, mesh_shape: Mapping[str, int]) -> int:
  """Number of pieces a logical dim is cut into by a rule entry on a mesh."""
  n = 1
  for a in mesh_axes_of(entry):
    n *= mesh_shape.get(a, 1)
  return n
