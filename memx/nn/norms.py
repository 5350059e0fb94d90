"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) · g, computed in float32."""

import jax
from flax import nnx

from memx.kernels.norms import rms_norm
from memx.nn._params import ones
from memx.parallel.axes import EMBED


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: str = "float32"):
    self.eps = eps
    self.scale = ones((dim,), (EMBED,), dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises the last axis in fp32 (bf16 variance is too coarse); output in x.dtype.

    The backward pass keeps only x (`memx.kernels.norms.rms_norm`)."""
    return rms_norm(x, self.scale[...], self.eps)
