"""APOLLO (Zhu et al. 2024): AdamW's per-element learning-rate scaling, approximated per channel
from Adam moments kept in a random low-rank projection of the gradient.

For a weight matrix W (m x n, m <= n) with gradient G, APOLLO draws a random projection
P (m x r, entries N(0, 1/r)), runs Adam on R = Pᵀ G (r x n: two r x n moments instead of two
m x n), and measures for every column j how much Adam rescales it:
s_j = ‖R̃[:, j]‖ / ‖R[:, j]‖ with R̃ = m̂ / (√v̂ + eps). The update is the raw gradient with its
columns scaled, G · diag(s), times √scale. A matrix with m > n projects from the right
(R = G P, P n x r) and scales rows. APOLLO-Mini uses rank 1 and one tensor-wise factor
s = ‖R̃‖ / ‖R‖ (with scale 128 in the paper).

Unlike GaLore the projection is not stored: it is regenerated from (seed, leaf, period) where
the period is step // every, so a new random subspace is drawn every `every` steps and the
state is only the low-rank moments. No SVD either.

Fira's norm-growth limiter (which APOLLO uses) caps the scaled gradient's norm at `limiter`
times the previous step's (after capping): a spike in the raw gradient cannot blow up the
update. A previous norm of 0 (the first step, or a zero gradient) imposes no cap.

Which leaves: those memx.train.lowrank plans to project among the `eligible` ones (the
decayed weights inside the blocks); every other leaf gets plain Adam. The moments keep the
weight's own dims beside the rank: a left projection of wq [d, heads, k] keeps [r, heads, k],
so sharding rules that name heads still apply.

Differences from the authors' implementation (apollo-torch 1.0): the channel factors are
computed from bias-corrected moments (theirs fold Adam's bias correction into the step size
after the limiter; the two agree once the correction has decayed), and a zero previous norm
lifts the limiter instead of freezing the weight.

The result is a `scale_by_*` transformation (no learning rate, no sign flip): memx.train.optim
chains it with decoupled weight decay and the schedule, as for AdamW.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from memx.train.lowrank import dims, matrix, plans, split

# Added to a norm that divides, as the authors' implementation does.
NORM_EPS = 1e-8
# The projections' own random stream: fold_in(key(seed), i) for small i equals the keys a run
# splits from the same seed (model init, data), so without it leaf 0's projection would reuse
# the model's initial values ("APOL").
PROJECTION_STREAM = 0x41504F4C


class ApolloState(NamedTuple):
  count: jax.Array
  mu: optax.Params         # per leaf: [r, *cols] (left), [*rows, r] (right) or the leaf's shape
  nu: optax.Params
  last_norm: optax.Params  # per leaf: [] the previous scaled gradient's norm (0: none yet)


def moment_shape(shape, kind: str, rank: int) -> tuple[int, ...]:
  """The moments' shape: the projected side replaced by the rank, the other dims kept."""
  if kind == "adam":
    return tuple(shape)
  i = split(shape)
  return (rank, *shape[i:]) if kind == "left" else (*shape[:i], rank)


def projection(seed: int, leaf: int, period, shape, kind: str, rank: int) -> jax.Array:
  """The random projection of leaf number `leaf` (its position in the flattened tree) during
  `period` (step // every): [m, r] for a left, [n, r] for a right projection, entries
  N(0, 1/r), the same whenever it is regenerated."""
  key = jax.random.fold_in(jax.random.key(seed), PROJECTION_STREAM)
  key = jax.random.fold_in(jax.random.fold_in(key, leaf), period)
  side = dims(shape)[kind == "right"]
  return jax.random.normal(key, (side, rank), jnp.float32) / math.sqrt(rank)


def scale_by_apollo(rank: int, every: int, scale: float = 1.0, *, tensorwise: bool = False,
                    limiter: float | None = 1.01, seed: int = 0, b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-8, eligible=None
                    ) -> optax.GradientTransformation:
  """APOLLO (tensorwise=False) or APOLLO-Mini (rank 1, tensorwise=True) as a scale_by
  transformation. eligible(params) -> a pytree of bools: which leaves may be projected (the
  others, and those too small for the rank, get Adam). limiter: Fira's norm-growth cap, None
  for none."""

  def kinds(params):
    return plans(params, rank, eligible)

  def init(params):
    k = kinds(params)
    def zeros():  # mu and nu: separate buffers (a donated train state must not alias)
      return jax.tree.map(lambda p, kind: jnp.zeros(moment_shape(p.shape, kind, rank),
                                                    jnp.float32), params, k)

    norms = jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)
    return ApolloState(jnp.zeros([], jnp.int32), zeros(), zeros(), norms)

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    period = state.count // every
    bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
    leaves, treedef = jax.tree.flatten(updates)
    flat_kinds = treedef.flatten_up_to(kinds(updates))
    moments = [treedef.flatten_up_to(t) for t in (state.mu, state.nu, state.last_norm)]
    out = []
    for leaf, (g, kind, mu, nu, last) in enumerate(zip(leaves, flat_kinds, *moments,
                                                       strict=True)):
      gm = g.astype(jnp.float32)
      if kind != "adam":
        p = projection(seed, leaf, period, g.shape, kind, rank)
        gm = matrix(gm)
        r = (p.T @ gm if kind == "left" else gm @ p).reshape(mu.shape)
      else:
        r = gm
      mu = b1 * mu + (1 - b1) * r
      nu = b2 * nu + (1 - b2) * jnp.square(r)
      adam = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
      if kind == "adam":
        out.append((adam.astype(g.dtype), mu, nu, last))
        continue
      r2 = r.reshape(gm.shape[0], rank) if kind == "right" else r.reshape(rank, gm.shape[1])
      adam2 = adam.reshape(r2.shape)
      if tensorwise:
        factor = jnp.linalg.norm(adam2) / (jnp.linalg.norm(r2) + NORM_EPS)
      else:  # one factor per column (left) or row (right) of the full matrix
        axis = 0 if kind == "left" else 1
        factor = jnp.linalg.norm(adam2, axis=axis, keepdims=True) / (
            jnp.linalg.norm(r2, axis=axis, keepdims=True) + NORM_EPS)
      scaled = gm * factor
      if limiter is not None:
        norm = jnp.linalg.norm(scaled)
        cap = jnp.where(last > 0, jnp.minimum(1.0, limiter * last / jnp.maximum(norm, 1e-30)),
                        1.0)
        scaled, last = scaled * cap, norm * cap
      step = math.sqrt(scale) * scaled
      out.append((step.reshape(g.shape).astype(g.dtype), mu, nu, last))

    fields = [treedef.unflatten([o[i] for o in out]) for i in range(4)]
    return fields[0], ApolloState(count, *fields[1:])

  return optax.GradientTransformation(init, update)
