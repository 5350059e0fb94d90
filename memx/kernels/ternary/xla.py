"""Packed ternary matmul in plain JAX: one plane of K/4 rows at a time (any backend).

x @ W = Σ_i x[:, i::4] @ W[i::4], and plane i of the packed bytes holds exactly the rows W[i::4],
so the full [K, N] weight is never formed; each plane is decoded with a shift and a mask
(XLA fuses the decode into the producer of the dot operand).
"""

import jax.numpy as jnp

from memx.kernels.ternary.reference import as_bytes, unpack_planes
from memx.typing import Array


def x_planes(x: Array, kp: int) -> Array:
  """x [M, K] → [M, 4, Kp]: zero-pad K to 4·Kp, then column 4j + i goes to [:, i, j]."""
  m, k = x.shape
  x = jnp.pad(x, ((0, 0), (0, 4 * kp - k)))
  return jnp.swapaxes(x.reshape(m, kp, 4), 1, 2)


def packed_matmul_xla(x: Array, packed: Array) -> Array:
  """x [M, K] (int8 or float) @ unpack(packed [⌈K/4⌉, N]) → int32 or float32 [M, N].

  packed: bytes or words (`to_words`); words are split back into bytes (one XLA op).
  """
  packed = as_bytes(packed)
  kp = packed.shape[0]
  xp = x_planes(x, kp)
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  acc_t = jnp.int32 if integer else jnp.float32
  out = None
  for i, plane in enumerate(unpack_planes(packed)):
    w = plane if integer else plane.astype(x.dtype)
    part = jnp.dot(xp[:, i], w, preferred_element_type=acc_t)
    out = part if out is None else out + part
  return out
