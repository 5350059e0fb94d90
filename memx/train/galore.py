"""GaLore (Zhao et al. 2024): Adam whose moments live in a low-rank projection of the gradient.

For a weight matrix W (m x n, m <= n) GaLore keeps a projection P (m x r, the top-r left
singular vectors of a gradient, recomputed every `every` steps) and runs Adam on the projected
gradient R = Pᵀ G (r x n), so the two moments take 2·r·n numbers instead of 2·m·n; the update is
scale · P · Adam(R). A matrix with m > n projects from the right (G Q, Q = top-r right singular
vectors, moments m x r). Learning stays full-parameter: every weight moves, within the
r-dimensional subspace of the current period.

Which leaves: the decayed weight tensors inside the blocks (attention, MLP and mixer
projections; not the embedding, the output head, norms, biases or SSM dynamics), viewed as
matrices split where the smaller side is largest (memx.train.lowrank), whose smaller side
exceeds the rank; every other leaf gets plain Adam moments. The moments are kept when the projection
is refreshed (as the authors' implementation does).

FRUGAL (Zmushko et al. 2024) keeps GaLore's state-full subspace and also moves the weights
along the rest of the gradient, state-free: free_scale > 0 adds free_scale · sign(G − P Pᵀ G)
(signSGD on the residual; G − G Q Qᵀ for right projections) to every projected leaf's update,
with the subspace update unscaled (scale 1). The optimizer state is GaLore's.

The result is a `scale_by_*` transformation (no learning rate, no sign flip): memx.train.optim
chains it with decoupled weight decay and the schedule, as for AdamW.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from memx.train.lowrank import dims as _dims
from memx.train.lowrank import matrix as _matrix
from memx.train.lowrank import plans


class GaLoreState(NamedTuple):
  count: jax.Array
  projections: optax.Params  # per leaf: [m, r] (left), [n, r] (right), or a [1] placeholder
  mu: optax.Params           # per leaf: projected (GaLore) or full (Adam) shape
  nu: optax.Params


def _projected_shape(shape, kind: str, rank: int) -> tuple[int, ...]:
  if kind == "adam":
    return tuple(shape)
  m, n = _dims(shape)
  return (rank, n) if kind == "left" else (m, rank)


def _top_vectors(g, kind: str, rank: int):
  """The projection from the gradient's SVD: top-r left ([m, r]) or right ([n, r]) vectors."""
  u, _, vt = jnp.linalg.svd(_matrix(g).astype(jnp.float32), full_matrices=False)
  return u[:, :rank] if kind == "left" else vt[:rank].T


def scale_by_galore(rank: int, every: int, scale: float, *, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, eligible=None, free_scale: float = 0.0
                    ) -> optax.GradientTransformation:
  """GaLore-Adam as a scale_by transformation. eligible(params) -> a pytree of bools: which
  leaves may be projected (the others, and those too small for the rank, get Adam).
  free_scale > 0: FRUGAL's state-free signSGD step on the residual, that times sign(residual)."""

  def kinds(params):
    return plans(params, rank, eligible)

  def init(params):
    k = kinds(params)
    def projection(p, kind):  # [m, r] (left), [n, r] (right), a [1] placeholder (adam)
      shape = (1,) if kind == "adam" else (_dims(p.shape)[kind == "right"], rank)
      return jnp.zeros(shape, jnp.float32)

    proj = jax.tree.map(projection, params, k)
    def zeros():  # mu and nu: separate buffers (a donated train state must not alias)
      return jax.tree.map(lambda p, kind: jnp.zeros(_projected_shape(p.shape, kind, rank),
                                                    jnp.float32), params, k)

    return GaLoreState(jnp.zeros([], jnp.int32), proj, zeros(), zeros())

  def update(updates, state, params=None):
    k = kinds(updates)
    count = state.count + 1
    refresh = (state.count % every) == 0

    def one(g, kind, p_old, mu, nu):
      if kind == "adam":
        r, p_new = g.astype(jnp.float32), p_old
      else:
        p_new = jax.lax.cond(refresh, lambda: _top_vectors(g, kind, rank), lambda: p_old)
        gm = _matrix(g).astype(jnp.float32)
        r = p_new.T @ gm if kind == "left" else gm @ p_new
      mu = b1 * mu + (1 - b1) * r
      nu = b2 * nu + (1 - b2) * jnp.square(r)
      step = (mu / (1 - b1 ** count)) / (jnp.sqrt(nu / (1 - b2 ** count)) + eps)
      if kind == "left":
        step = scale * (p_new @ step)
      elif kind == "right":
        step = scale * (step @ p_new.T)
      if kind != "adam" and free_scale:
        back = p_new @ r if kind == "left" else r @ p_new.T      # the subspace's part of G
        step = step + free_scale * jnp.sign(gm - back)
      return step.reshape(g.shape).astype(g.dtype), p_new, mu, nu

    out = jax.tree.map(one, updates, k, state.projections, state.mu, state.nu)
    pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=lambda t: isinstance(t, tuple))  # noqa: E731
    return pick(0), GaLoreState(count, pick(1), pick(2), pick(3))

  return optax.GradientTransformation(init, update)
