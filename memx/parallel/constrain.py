"""Activation sharding by logical names: `constrain(x, (BATCH, SEQ, EMBED))`.

Parameters get their shardings from the `axes` metadata and the strategy's rule table
(memx.train.step.state_shardings); activations get theirs here. The active rules are Flax's
(`nnx.logical_axis_rules`, which `use_rules` and `sharding_context` enter), the active mesh is
JAX's (`jax.set_mesh`). Without a mesh or without rules, `constrain` returns x unchanged, so
model code calls it unconditionally and still runs on one device (big_vision's
`with_logical_constraint`, MaxText's `_maybe_shard_with_logical`).
"""

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

from memx.parallel.rules import RULES, Rules, logical_to_spec


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
  """How attention runs when the rules split SEQ (see ParallelConfig.sequence_*)."""

  method: str = "ring"
  layout: str = "contiguous"


class _Local(threading.local):
  # Per thread, like Flax's rules: a stack so nested contexts restore the outer options.
  stack: list[SequenceOptions]

  def __init__(self):
    self.stack = [SequenceOptions()]


_SEQUENCE = _Local()


def _jit_key_state():
  """A JAX config state that is part of jit's cache key (JAX-internal API): the rules and the
  sequence options are read while tracing, so a function jitted under one sharding context
  must be traced again under another, not reuse the first program (the mesh alone is in the
  key). None where this JAX lacks the API: then re-jit (a new function) to switch contexts."""
  try:
    from jax._src import config as jax_config  # noqa: PLC0415
    return jax_config.string_or_object_state(
        "memx_sharding_context", None, "memx.parallel.constrain.sharding_context's rules and "
        "sequence options (part of the jit cache key)", include_in_jit_key=True,
        include_in_trace_context=True)
  except (ImportError, AttributeError, TypeError, ValueError):
    return None


_JIT_KEY = _jit_key_state()


def active_rules() -> Rules:
  return tuple(spmd.get_logical_axis_rules())


def active_mesh():
  """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def sequence_options() -> SequenceOptions:
  return _SEQUENCE.stack[-1]


@contextlib.contextmanager
def use_rules(rules: Rules | str) -> Iterator[Rules]:
  """Makes `rules` (a table, or a strategy name in RULES) the active logical-axis rules."""
  table = RULES[rules] if isinstance(rules, str) else tuple(rules)
  with spmd.logical_axis_rules(table):
    yield table


@contextlib.contextmanager
def sharding_context(mesh, strategy: str, *, sequence_method: str = "ring",
                     sequence_layout: str = "contiguous") -> Iterator[None]:
  """Mesh + rules + sequence-parallel options for tracing a step (enter around jit/lower).

  The layout must be the order the batch's tokens arrive in (ParallelConfig.layout).
  """
  options = SequenceOptions(sequence_method, sequence_layout)
  _SEQUENCE.stack.append(options)
  key = contextlib.nullcontext() if _JIT_KEY is None else _JIT_KEY(
      (strategy if isinstance(strategy, str) else tuple(strategy), options))
  try:
    with jax.set_mesh(mesh), use_rules(strategy), key:
      yield
  finally:
    _SEQUENCE.stack.pop()


def spec_for(axes: Sequence[str | None], rules: Rules | None = None, mesh=None) -> PartitionSpec:
  """PartitionSpec of logical `axes` under the active (or given) rules and mesh."""
  rules = active_rules() if rules is None else rules
  mesh = active_mesh() if mesh is None else mesh
  return logical_to_spec(axes, rules, None if mesh is None else dict(mesh.shape))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without an active mesh or rules."""
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape "
                     f"{x.shape}")
  mesh, rules = active_mesh(), active_rules()
  if mesh is None or not rules:
    return x
  spec = logical_to_spec(axes, rules, dict(mesh.shape))
  # A bare spec binds to the context mesh (abstract while tracing, concrete outside jit).
  return jax.lax.with_sharding_constraint(x, spec)
