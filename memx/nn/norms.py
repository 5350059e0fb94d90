"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) · g, computed in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.nn._params import ones
from memx.parallel.axes import EMBED


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: str = "float32"):
    self.eps = eps
    self.scale = ones((dim,), (EMBED,), dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises the last axis in fp32 (bf16 variance is too coarse); output in x.dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    y = x32 * jax.lax.rsqrt(var + self.eps) * scale
    return y.astype(x.dtype)
