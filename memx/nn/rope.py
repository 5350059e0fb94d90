"""Rotary position embedding (Su et al., 2021, RoFormer eq. 34), half-split layout."""

import jax.numpy as jnp

from memx.typing import Array, Float, Int


def apply_rope(x: Float[Array, "B T H K"], positions: Int[Array, "B T"], *,
               theta: float) -> Float[Array, "B T H K"]:
  """Rotates pairs (x[..., i], x[..., i + K/2]) by angle pos · theta^(-2i/K); fp32 math."""
  k = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)            # [K/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs[None, None, :]  # [B, T, K/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
