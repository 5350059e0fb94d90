"""Frozen quantized projection weights: NF4Weight (QLoRA's 4-bit NormalFloat bases) and
IntQWeight (group-wise affine integers, as GPTQ and round-to-nearest produce them).

A weight [in..., out...] is viewed as the matrix [K = prod(in), N = prod(out)] and quantized
along K. The arrays are `Quantized` variables, not nnx.Param: no optimizer, gradient or weight
decay ever sees them, and checkpoints hold them as they are. Both forms serve `weight[...]`
(the dequantized weight, shaped and typed as the original) and `matmul(x, n_in, dtype)`, the
product on the stored codes, which `memx.nn.lora.linear` calls.

NF4Weight: blocks of NF4_BLOCK consecutive rows per column (memx.kernels.nf4): codes uint8
[K/2, N] (two per byte) and one absmax per block, itself double-quantized (int8 in groups of
NF4_GROUP, one float32 scale per group, minus their mean).
IntQWeight: bits-bit codes packed along K, a float32 scale and zero point per group of
group_size rows per column (memx.kernels.intq).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels import intq, nf4

NF4_BLOCK = 64  # QLoRA's block size for the weights' absmax
NF4_GROUP = 256  # and for the double quantization of those absmax values


class Quantized(nnx.Variable):
  """A frozen array of a quantized weight (codes and scales). Its `axes` name the matrix view's
  rows and columns by the weight's first input and first output axis (the flattened dims split
  in contiguous blocks, as those axes would), so the sharding rules split the codes as they
  split the weight (memx.train.step.state_shardings, where a dim the mesh does not divide
  stays whole)."""


def matrix_axes(axes, n_in: int) -> tuple | None:
  """(rows, cols) logical axes of a weight's [K, N] view: its first input and first output
  axis."""
  return None if axes is None else (axes[0], axes[n_in])


class NF4Weight(nnx.Module):
  def __init__(self, codes, absmax_q, absmax_scales, absmax_offset, *, shape, n_in, dtype,
               axes=None):
    view = matrix_axes(axes, n_in)
    self.codes = Quantized(codes, axes=view)
    self.absmax_q = Quantized(absmax_q, axes=view)
    self.absmax_scales = Quantized(absmax_scales)
    self.absmax_offset = Quantized(absmax_offset)
    self.shape = tuple(shape)
    self.n_in = n_in
    self.dtype = jnp.dtype(dtype)
    self.axes = None if axes is None else tuple(axes)

  @classmethod
  def from_weight(cls, weight, n_in: int) -> "NF4Weight":
    """Quantizes an nnx.Param (or array) whose first n_in dims are its inputs. Raises
    ValueError when the input size K = prod(in dims) is not a multiple of NF4_BLOCK."""
    w = weight[...] if isinstance(weight, nnx.Variable) else weight
    axes = weight.get_metadata().get("axes") if isinstance(weight, nnx.Variable) else None
    shape = tuple(w.shape)
    k, n = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if k % NF4_BLOCK:
      raise ValueError(f"NF4Weight: a weight of shape {shape} has K = {k} input features, not a "
                       f"multiple of the NF4 block size {NF4_BLOCK}; quantize only weights whose "
                       f"input size is a multiple of {NF4_BLOCK} (or leave this one unquantized)")
    codes, absmax = nf4.quantize(w.reshape(k, n).astype(jnp.float32), block_size=NF4_BLOCK)
    q, scales, offset = nf4.quantize_absmax(absmax, group_size=NF4_GROUP)
    return cls(codes, q, scales, offset, shape=shape, n_in=n_in, dtype=w.dtype, axes=axes)

  def absmax(self) -> jax.Array:
    """The first-level block scales float32 [K / NF4_BLOCK, N] (undoing double quantization)."""
    return nf4.dequantize_absmax(self.absmax_q[...], self.absmax_scales[...],
                                 self.absmax_offset[...], group_size=NF4_GROUP)

  def __getitem__(self, index):
    """The dequantized weight, shaped and typed as the original."""
    w = nf4.dequantize(self.codes[...], self.absmax(), block_size=NF4_BLOCK)
    return w.reshape(self.shape).astype(self.dtype)[index]

  def matmul(self, x: jax.Array, n_in: int, dtype) -> jax.Array:
    """x [..., in...] · W → [..., out...] in `dtype`, on the packed codes."""
    if n_in != self.n_in:
      raise ValueError(f"NF4Weight: quantized with {self.n_in} input dims, called with {n_in}")
    lead = x.shape[:x.ndim - n_in]
    k = math.prod(self.shape[:n_in])
    y = nf4.nf4_matmul(x.reshape(-1, k).astype(dtype), self.codes[...], self.absmax(),
                       block_size=NF4_BLOCK)
    return y.reshape(*lead, *self.shape[n_in:]).astype(dtype)

  def nbytes(self) -> int:
    return int(sum(v[...].size * v[...].dtype.itemsize for v in (
        self.codes, self.absmax_q, self.absmax_scales, self.absmax_offset)))


class IntQWeight(nnx.Module):
  def __init__(self, packed, scales, zeros, *, shape, n_in, dtype, bits, group_size,
               axes=None):
    view = matrix_axes(axes, n_in)
    self.packed = Quantized(packed, axes=view)
    self.scales = Quantized(scales, axes=view)
    self.zeros = Quantized(zeros, axes=view)
    self.shape = tuple(shape)
    self.n_in = n_in
    self.dtype = jnp.dtype(dtype)
    self.bits = bits
    self.group_size = group_size
    self.axes = None if axes is None else tuple(axes)

  @classmethod
  def from_codes(cls, weight, n_in: int, codes, scales, zeros, *, bits: int,
                 group_size: int) -> "IntQWeight":
    """The quantized form of `weight` (an nnx.Param or array; only its shape, dtype and axes are
    read) from codes uint8 [K, N], scales and zeros [K / group_size, N]."""
    w = weight[...] if isinstance(weight, nnx.Variable) else weight
    axes = weight.get_metadata().get("axes") if isinstance(weight, nnx.Variable) else None
    return cls(intq.pack(codes, bits), scales, zeros, shape=w.shape, n_in=n_in, dtype=w.dtype,
               bits=bits, group_size=group_size, axes=axes)

  def _k(self) -> int:
    return math.prod(self.shape[:self.n_in])

  def __getitem__(self, index):
    """The dequantized weight, shaped and typed as the original."""
    codes = intq.unpack(self.packed[...], self.bits, self._k())
    w = intq.dequantize(codes, self.scales[...], self.zeros[...], self.group_size)
    return w.reshape(self.shape).astype(self.dtype)[index]

  def matmul(self, x: jax.Array, n_in: int, dtype) -> jax.Array:
    """x [..., in...] · W → [..., out...] in `dtype`, on the packed codes."""
    if n_in != self.n_in:
      raise ValueError(f"IntQWeight: quantized with {self.n_in} input dims, called with {n_in}")
    lead = x.shape[:x.ndim - n_in]
    y = intq.intq_matmul(x.reshape(-1, self._k()).astype(dtype), self.packed[...],
                         self.scales[...], self.zeros[...], bits=self.bits,
                         group_size=self.group_size)
    return y.reshape(*lead, *self.shape[n_in:]).astype(dtype)

  def nbytes(self) -> int:
    return int(sum(v[...].size * v[...].dtype.itemsize
                   for v in (self.packed, self.scales, self.zeros)))
