"""RMSNorm (Zhang & Sennrich, 2019) whose backward pass keeps only its input.

    y = x · r · g,   r = rsqrt(mean(x²) + eps)   (float32 statistics, output in x.dtype)

`rms_norm_reference` is the expression differentiated by autodiff, which keeps the normalised
activations (and often x·r and x·r·g separately) for the backward pass: several [..., D]
float32 tensors per norm. `rms_norm` has the same forward with a custom VJP whose only residuals
are x and g; the backward recomputes r (one reduction) and applies

    x̂ = x·r,   dg = Σ dy ⊙ x̂,   dx = r · (g⊙dy − x̂ · mean(g⊙dy ⊙ x̂))

(`rms_norm_vjp`, also used by the fused BitLinear). What the norm keeps is then its input
alone; its output is kept by whatever consumes it (e.g. a projection), as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memx.typing import Array


def _stats(x, eps: float):
  x32 = x.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return x32 * r, r


def _row(g, ndim: int):
  """g [D] as float32 [1, ..., 1, D] (explicit rank, as rank promotion may be an error)."""
  return g.astype(jnp.float32).reshape((1,) * (ndim - 1) + (-1,))


def rms_norm_reference(x: Array, g: Array, eps: float = 1e-6) -> Array:
  """The oracle: float32 statistics, output in x.dtype, plain autodiff."""
  xhat, _ = _stats(x, eps)
  return (xhat * _row(g, x.ndim)).astype(x.dtype)


def rms_norm_vjp(x: Array, g: Array, eps: float, dy: Array) -> tuple[Array, Array]:
  """(dx float32 [..., D], dg float32 [D]) for y = RMSNorm(x)·g and cotangent dy."""
  xhat, r = _stats(x, eps)
  dy32 = dy.astype(jnp.float32)
  gd = dy32 * _row(g, x.ndim)
  dg = jnp.sum(dy32 * xhat, axis=tuple(range(x.ndim - 1)))  # no reshape: see bitlinear
  dx = r * (gd - xhat * jnp.mean(gd * xhat, axis=-1, keepdims=True))
  return dx, dg


def rms_norm(x: Array, g: Array, eps: float = 1e-6) -> Array:
  """RMSNorm over the last axis, x [..., D] and scale g [D] (floats); its backward pass keeps
  only x and g."""
  xs, gs = getattr(x, "shape", None), getattr(g, "shape", None)
  if xs is None or len(xs) < 1 or gs != (xs[-1],):
    raise ValueError(f"rms_norm: x must be [..., D] and the scale g [D]; got x {xs}, g {gs}")
  for name, a in (("x", x), ("g", g)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"rms_norm: {name} must be a float array; got {a.dtype}")
  return _rms_norm(x, g, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: Array, g: Array, eps: float = 1e-6) -> Array:
  return rms_norm_reference(x, g, eps)


def _fwd(x, g, eps):
  return rms_norm_reference(x, g, eps), (x, g)


def _bwd(eps, res, dy):
  # The barrier (tied to dy, so it cannot be hoisted) keeps XLA from CSE-ing the recomputed
  # statistics with the forward's, which would keep the forward's [..., D] values alive.
  x, g, dy = jax.lax.optimization_barrier(res + (dy,))
  dx, dg = rms_norm_vjp(x, g, eps, dy)
  return dx.astype(x.dtype), dg.astype(g.dtype)


_rms_norm.defvjp(_fwd, _bwd)
