"""MeZO: training from forward passes alone (Malladi et al. 2023), with Sparse MeZO's
magnitude masks (Liu et al. 2024; the seed catalog's §2.7).

One step estimates the gradient with SPSA. Draw z ~ N(0, I) over the trainable parameters and
set g = (L(θ + εz) − L(θ − εz)) / 2ε, the directional derivative along z (exact for a quadratic
loss). Then (g·z) goes to the optimizer as the gradient; MeZO's paper pairs it with SGD
(optim.name "sgd"), and optax's AdamW gives MeZO-Adam. z is never stored. It is drawn again
from the step's key, one leaf after another, for the +ε pass, the −ε pass and the update, and
barriers keep XLA from drawing every leaf's z at once. No backward pass runs, so no activations
are kept for one. What a step holds besides the weights is one perturbed copy of the trainable
weights (θ ± εz; the update writes into the weights' own buffers) and one forward pass's
activations: less than backprop where activations dominate (long rows, large batches: 0.3x at
the CPU bench size), more at batch 1 on short rows, where backprop's gradient fuses into the
update (`scripts/bench_optimizers.py`, tests/train/test_mezo.py). The paper's in-place
perturbation (θ += εz, −= 2εz, += εz) would drop the copy at the cost of rounding drift.

Sparse MeZO perturbs only part of each tensor: the fraction 1 − s of its entries with the
smallest magnitude (s = optim.mezo_sparsity; the threshold is taken from θ at the start of
the step). The paper finds that large weights' noisy zeroth-order updates hurt most.
"""

import jax
import jax.numpy as jnp


def _leaf_keys(key: jax.Array, tree) -> list:
  return list(jax.random.split(key, max(len(jax.tree.leaves(tree)), 1)))


def masks(params, sparsity: float):
  """Per leaf, True where Sparse MeZO perturbs: |θ| at or below the (1 − sparsity) quantile of
  the tensor's magnitudes; None (every entry) when sparsity is 0."""
  if sparsity == 0.0:
    return None

  def one(p):
    mag = jnp.abs(p.astype(jnp.float32))
    return mag <= jnp.quantile(mag.reshape(-1), 1.0 - sparsity)
  return jax.tree.map(one, params)


def _leafwise(fn, params, key: jax.Array, mask=None):
  """fn(p, z) per leaf, with z a standard normal draw (float32, zero outside the mask) from the
  leaf's key, one leaf after another: a barrier ties each leaf's draw to the previous leaf's
  result, so XLA cannot draw every z first and hold them all (a parameter-sized temporary
  per z)."""
  leaves, tree = jax.tree.flatten(params)
  mask_leaves = [None] * len(leaves) if mask is None else jax.tree.leaves(mask)
  out = []
  for p, k, m in zip(leaves, _leaf_keys(key, params), mask_leaves, strict=True):
    if out:
      p, k, m, out[-1] = jax.lax.optimization_barrier((p, k, m, out[-1]))
    z = jax.random.normal(k, p.shape, jnp.float32)
    out.append(fn(p, z if m is None else jnp.where(m, z, 0.0)))
  return jax.tree.unflatten(tree, out)


def direction(params, key: jax.Array, mask=None):
  """z: a standard normal tree over params (float32), zero outside the mask, drawn from key
  (the same key gives the same z: it is drawn again instead of stored)."""
  return _leafwise(lambda p, z: z, params, key, mask)


def shifted(params, key: jax.Array, scale, mask=None):
  """θ + scale·z in the parameters' dtypes (z: `direction(params, key, mask)`)."""
  return _leafwise(lambda p, z: (p.astype(jnp.float32) + scale * z).astype(p.dtype),
                   params, key, mask)


def spsa(loss_of, params, key: jax.Array, eps: float, sparsity: float = 0.0):
  """MeZO's estimate: (g, mean loss, gradient tree g·z in the parameters' dtypes) for
  loss_of(params) → scalar, with g = (L(θ + εz) − L(θ − εz)) / 2ε."""
  mask = masks(params, sparsity)
  loss_plus = loss_of(shifted(params, key, eps, mask))
  # The barriers order the passes: θ − εz is made only once L(θ + εz) is known (so one
  # perturbed copy exists at a time), and the update's z only after both. The key passes them
  # too: otherwise XLA computes the three identical draws of z once and keeps it whole.
  params, mask, key, loss_plus = jax.lax.optimization_barrier((params, mask, key, loss_plus))
  loss_minus = loss_of(shifted(params, key, -eps, mask))
  params, mask, key, loss_minus = jax.lax.optimization_barrier((params, mask, key, loss_minus))
  g = (loss_plus.astype(jnp.float32) - loss_minus.astype(jnp.float32)) / (2 * eps)
  grads = _leafwise(lambda p, z: (g * z).astype(p.dtype), params, key, mask)
  return g, (loss_plus + loss_minus) / 2, grads
