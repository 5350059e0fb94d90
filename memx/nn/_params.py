"""Parameter creation with logical axis names and explicit dtypes."""

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *, std: float,
          dtype: str) -> nnx.Param:
  """Truncated-normal parameter; `axes` names each dim logically (memx.parallel.axes)."""
  if len(axes) != len(shape):
    raise ValueError(f"param: {len(axes)} axis names for shape {shape}")
  value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  return nnx.Param(value.astype(DTYPES[dtype]), axes=axes)


def ones(shape: tuple[int, ...], axes: tuple[str, ...], *, dtype: str) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, DTYPES[dtype]), axes=axes)
