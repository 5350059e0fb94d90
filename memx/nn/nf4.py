"""NF4Weight: a frozen projection weight stored in 4-bit NormalFloat (QLoRA's base weights).

The weight [in..., out...] is viewed as the matrix [K = prod(in), N = prod(out)] and quantized
in blocks of BLOCK consecutive rows per column (memx.kernels.nf4): codes uint8 [K/2, N] (two per
byte) and one absmax per block, itself double-quantized (int8 in groups of GROUP, one float32
scale per group, minus their mean). The arrays are `Quantized` variables, not nnx.Param: no
optimizer, gradient or weight decay ever sees them, and checkpoints hold them as they are.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels import nf4

BLOCK = 64  # QLoRA's block size for the weights' absmax
GROUP = 256  # and for the double quantization of those absmax values


class Quantized(nnx.Variable):
  """A frozen array of a quantized weight (codes and scales)."""


class NF4Weight(nnx.Module):
  def __init__(self, codes, absmax_q, absmax_scales, absmax_offset, *, shape, n_in, dtype,
               axes=None):
    self.codes = Quantized(codes)
    self.absmax_q = Quantized(absmax_q)
    self.absmax_scales = Quantized(absmax_scales)
    self.absmax_offset = Quantized(absmax_offset)
    self.shape = tuple(shape)
    self.n_in = n_in
    self.dtype = jnp.dtype(dtype)
    self.axes = None if axes is None else tuple(axes)

  @classmethod
  def from_weight(cls, weight, n_in: int) -> "NF4Weight":
    """Quantizes an nnx.Param (or array) whose first n_in dims are its inputs. Raises
    ValueError when the input size K = prod(in dims) is not a multiple of BLOCK."""
    w = weight[...] if isinstance(weight, nnx.Variable) else weight
    axes = weight.get_metadata().get("axes") if isinstance(weight, nnx.Variable) else None
    shape = tuple(w.shape)
    k, n = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if k % BLOCK:
      raise ValueError(f"NF4Weight: a weight of shape {shape} has K = {k} input features, not a "
                       f"multiple of the NF4 block size {BLOCK}; quantize only weights whose "
                       f"input size is a multiple of {BLOCK} (or leave this one unquantized)")
    codes, absmax = nf4.quantize(w.reshape(k, n).astype(jnp.float32), block_size=BLOCK)
    q, scales, offset = nf4.quantize_absmax(absmax, group_size=GROUP)
    return cls(codes, q, scales, offset, shape=shape, n_in=n_in, dtype=w.dtype, axes=axes)

  def absmax(self) -> jax.Array:
    """The first-level block scales float32 [K / BLOCK, N] (undoing double quantization)."""
    return nf4.dequantize_absmax(self.absmax_q[...], self.absmax_scales[...],
                                 self.absmax_offset[...], group_size=GROUP)

  def __getitem__(self, index):
    """The dequantized weight, shaped and typed as the original."""
    w = nf4.dequantize(self.codes[...], self.absmax(), block_size=BLOCK)
    return w.reshape(self.shape).astype(self.dtype)[index]

  def matmul(self, x: jax.Array, n_in: int, dtype) -> jax.Array:
    """x [..., in...] · W → [..., out...] in `dtype`, on the packed codes."""
    if n_in != self.n_in:
      raise ValueError(f"NF4Weight: quantized with {self.n_in} input dims, called with {n_in}")
    lead = x.shape[:x.ndim - n_in]
    k = math.prod(self.shape[:n_in])
    y = nf4.nf4_matmul(x.reshape(-1, k).astype(dtype), self.codes[...], self.absmax(),
                       block_size=BLOCK)
    return y.reshape(*lead, *self.shape[n_in:]).astype(dtype)

  def nbytes(self) -> int:
    return int(sum(v[...].size * v[...].dtype.itemsize for v in (
        self.codes, self.absmax_q, self.absmax_scales, self.absmax_offset)))
