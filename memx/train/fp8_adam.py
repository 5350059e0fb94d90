"""AdamW with both moments stored in FP8 (E4M3), as COAT does (Xi et al. 2024; the seed
catalog's §2.7): 1 byte per number plus, per group of 128 along the last axis, a float32 scale
and expansion exponent, so about 2.1 bytes of state per parameter instead of 8.

Each group is scaled by its largest magnitude M into [0, 1]. A moment's group usually spans
far less than E4M3's dynamic range (2^-6 to 448 in normal numbers: 28672), so plain scaling
leaves most codes unused and rounds small entries coarsely or to zero. COAT's Dynamic Range
Expansion maps y = |x| / M to y^k before the cast, with k = log(28672) / log(M / m) (m: the
group's smallest nonzero magnitude), so the group's range fills E4M3's. Decoding takes the k-th
root: the cast's relative error (at most 2^-4) is divided by k, or multiplied when a group
spans more than E4M3 (k < 1; rare in moments). expand=False gives the plain group-scaled FP8
of the ablation.

The moments are dequantized, updated in float32 as optax's Adam, and quantized again every
step. Codes keep their parameter's shape, so under FSDP they shard with it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUP = 128
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
# E4M3's normal range, max / min normal: expansion aims the group's range at it (subnormals
# would lose precision).
FP8_RANGE = FP8_MAX / 2.0 ** -6
EXPONENT_LIMITS = (1.0 / 16, 64.0)


class FP8Moment(NamedTuple):
  """codes: the parameter's shape, E4M3; scale, exponent: one float32 per group of the last
  axis ([..., groups])."""

  codes: jax.Array
  scale: jax.Array
  exponent: jax.Array


def group_size(shape: tuple[int, ...]) -> int:
  """Groups of 128 along the last axis, or the whole last axis when 128 does not divide it
  (and for scalars, the one number)."""
  last = shape[-1] if shape else 1
  return GROUP if last % GROUP == 0 else last


def _grouped(x: jax.Array) -> jax.Array:
  x = x.reshape(x.shape or (1,))
  return x.reshape(*x.shape[:-1], x.shape[-1] // group_size(x.shape), group_size(x.shape))


def quantize(x: jax.Array, *, expand: bool = True) -> FP8Moment:
  """x (float32) → its FP8 form (zeros map to zero codes; an all-zero group gets scale 0)."""
  g = _grouped(x.astype(jnp.float32))
  mag = jnp.abs(g)
  top = jnp.max(mag, axis=-1)
  safe_top = jnp.where(top > 0, top, 1.0)
  y = mag / safe_top[..., None]                                       # in [0, 1]
  if expand:
    low = jnp.min(jnp.where(mag > 0, mag, jnp.inf), axis=-1)
    ratio = jnp.where(jnp.isfinite(low), top / jnp.where(jnp.isfinite(low), low, 1.0), 1.0)
    k = jnp.where(ratio > 1.0, jnp.log(FP8_RANGE) / jnp.log(jnp.maximum(ratio, 1.0 + 1e-6)),
                  EXPONENT_LIMITS[1])
    k = jnp.clip(k, *EXPONENT_LIMITS)
  else:
    k = jnp.ones_like(top)
  code = jnp.sign(g) * jnp.minimum(FP8_MAX * y ** k[..., None], FP8_MAX)
  return FP8Moment(code.astype(FP8).reshape(x.shape), top, k)


def dequantize(q: FP8Moment) -> jax.Array:
  """The float32 moment an FP8Moment stands for."""
  c = _grouped(q.codes.astype(jnp.float32))
  y = (jnp.abs(c) / FP8_MAX) ** (1.0 / q.exponent[..., None])
  return (jnp.sign(c) * y * q.scale[..., None]).reshape(q.codes.shape)


class ScaleByAdamFP8State(NamedTuple):
  """Each moment as three trees over the parameters (codes, scales, exponents), so that every
  optimizer array is one leaf per parameter: nnx gives it the parameter's logical axes, and
  FSDP splits the codes as the parameter and the group statistics on the dims they share."""

  count: jax.Array
  mu_codes: optax.Params
  mu_scale: optax.Params
  mu_exponent: optax.Params
  nu_codes: optax.Params
  nu_scale: optax.Params
  nu_exponent: optax.Params


def _store(moments) -> tuple:
  """A tree of float32 moments → (codes, scales, exponents) trees."""
  fields = ("codes", "scale", "exponent")
  return tuple(jax.tree.map(lambda m, f=f: getattr(m, f), moments,
                            is_leaf=lambda x: isinstance(x, FP8Moment)) for f in fields)


def scale_by_adam_fp8(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                      expand: bool = True) -> optax.GradientTransformation:
  """optax.scale_by_adam with FP8 moments (see the module docstring)."""
  def quantized(tree):
    return _store(jax.tree.map(lambda x: quantize(x, expand=expand), tree))

  def init(params):
    # One set of trees per moment: a donated state must not hold one buffer twice.
    zeros = lambda: quantized(jax.tree.map(  # noqa: E731
        lambda p: jnp.zeros(p.shape, jnp.float32), params))
    return ScaleByAdamFP8State(jnp.zeros([], jnp.int32), *zeros(), *zeros())

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count
    leaves, tree = jax.tree.flatten(updates)
    moments = [jax.tree.leaves(t) for t in state[1:]]
    outs, new = [], []
    for i, g in enumerate(leaves):
      mc, ms, mk, nc, ns, nk = (m[i] for m in moments)
      if new:
        # One leaf at a time: its float32 moments exist only while it updates (XLA would
        # otherwise dequantize every leaf first: two parameter-sized float32 temporaries).
        (g, mc, ms, mk, nc, ns, nk), new[-1] = jax.lax.optimization_barrier(
            ((g, mc, ms, mk, nc, ns, nk), new[-1]))
      g32 = g.astype(jnp.float32)
      m = b1 * dequantize(FP8Moment(mc, ms, mk)) + (1 - b1) * g32
      v = b2 * dequantize(FP8Moment(nc, ns, nk)) + (1 - b2) * jnp.square(g32)
      outs.append(((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype))
      new.append((*quantize(m, expand=expand), *quantize(v, expand=expand)))
    fields = [jax.tree.unflatten(tree, [n[j] for n in new]) for j in range(6)]
    return jax.tree.unflatten(tree, outs), ScaleByAdamFP8State(count, *fields)

  return optax.GradientTransformation(init, update)
