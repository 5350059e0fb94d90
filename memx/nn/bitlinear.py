"""BitLinear (BitNet b1.58; MatMul-free LM §3.1): RMSNorm → 8-bit activations → ternary weights.

Training form (`BitLinear`): full-precision latent weights; the forward uses the fake-quantized
values (absmean ternary weights, per-token absmax int8 activations) and the backward passes
gradients straight through both quantizers to the latent weights, as ridgerchu/matmulfreellm's
`BitLinear` (which also fuses an RMSNorm in front, so every projection sees unit-RMS input).
The op is `memx.kernels.ternary.bitlinear`: by default it keeps only its input for the backward
pass and recomputes the norm and quantizers there (the fused kernel's memory saving).

Inference form (`PackedBitLinear`, from `BitLinear.pack()` or `pack_bitlinears(model)`): the
weights stored as 2-bit codes (4 per byte) plus one fp32 scale; the matmul runs on int8
activation codes and the packed weights (memx.kernels.ternary.packed_matmul, int32 accumulation)
and is rescaled by s_w / s_x afterwards. The codes are held as int32 words (`to_words`: the same
bytes, 4 columns per word) when the output width is a multiple of 4, so the GPU decode kernel
loads them 16 weights at a time; else as bytes. Files keep bytes (memx.models.packed).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels.norms import rms_norm_reference
from memx.kernels.ternary import (
    absmax_quantize,
    absmean_quantize,
    pack_ternary,
    packed_matmul,
    to_words,
)
from memx.kernels.ternary.bitlinear import bitlinear
from memx.kernels.ternary.reference import packed_cols
from memx.nn._params import DTYPES, ones, param


class PackedWeight(nnx.Variable):
  """2-bit packed ternary codes and their scale: inference state, not trained."""


class BitLinear(nnx.Module):
  """x [..., in] → [..., out]: RMSNorm(x) then a ternary-weight, int8-activation projection.

  quantize=False keeps the same layer (norm included) in full precision: the ablation baseline.
  """

  def __init__(self, in_dim: int, out_dim: int, *, axes: tuple[str, str], std: float,
               rngs: nnx.Rngs, param_dtype: str = "float32", compute_dtype: str = "float32",
               eps: float = 1e-6, quantize: bool = True, implementation=None):
    self.in_dim, self.out_dim, self.eps, self.quantize = in_dim, out_dim, eps, quantize
    self.compute_dtype, self.implementation = compute_dtype, implementation
    self.norm = ones((in_dim,), (axes[0],), dtype=param_dtype)
    self.weight = param(rngs, (in_dim, out_dim), axes, std=std, dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.apply(x, self.norm[...], self.weight[...])

  def apply(self, x: jax.Array, norm: jax.Array, weight: jax.Array) -> jax.Array:
    """This layer's op on explicit parameter arrays (for use inside jax.checkpoint)."""
    return bitlinear(x, norm, weight, eps=self.eps, quantize=self.quantize,
                     compute_dtype=DTYPES[self.compute_dtype], implementation=self.implementation)

  def params(self) -> tuple[jax.Array, jax.Array]:
    return self.norm[...], self.weight[...]

  def pack(self, *, implementation=None) -> "PackedBitLinear":
    """The packed inference form of this layer (requires quantize=True)."""
    if not self.quantize:
      raise ValueError("BitLinear.pack: this layer is not quantized (quantize=False / "
                       "model.ternary=False); only ternary layers have a packed form")
    codes, scale = absmean_quantize(self.weight[...])
    return PackedBitLinear(pack_ternary(codes), scale, self.norm[...], in_dim=self.in_dim,
                           eps=self.eps, compute_dtype=self.compute_dtype,
                           implementation=implementation)


def serving_layout(packed: jax.Array) -> jax.Array:
  """Packed bytes uint8 [⌈in/4⌉, out] in the layout PackedBitLinear holds: int32 words when
  out is a multiple of 4 (converted once, here), else the bytes themselves."""
  packed = jnp.asarray(packed)
  if packed.dtype == jnp.uint8 and packed.ndim == 2 and packed.shape[1] % 4 == 0:
    return to_words(packed)
  return packed


class PackedBitLinear(nnx.Module):
  """Inference-only BitLinear over 2-bit packed weights ([⌈in/4⌉, out] bytes or [⌈in/4⌉, out/4]
  int32 words, `serving_layout`) and an fp32 scale.

  packed: uint8 is read as bytes (`pack_ternary`'s output) and int32 always as words
  (`to_words`), never as byte values widened to int32; other dtypes raise.
  """

  def __init__(self, packed: jax.Array, scale: jax.Array, norm: jax.Array, *, in_dim: int,
               eps: float = 1e-6, compute_dtype: str = "float32", implementation=None):
    self.in_dim, self.eps, self.compute_dtype = in_dim, eps, compute_dtype
    self.implementation = implementation
    packed = jnp.asarray(packed)
    if packed.dtype not in (jnp.uint8, jnp.int32):
      raise ValueError(f"PackedBitLinear: packed codes must be uint8 bytes or int32 words, got "
                       f"{packed.dtype}")
    self.packed = PackedWeight(serving_layout(packed))
    self.scale = PackedWeight(jnp.asarray(scale, jnp.float32))
    self.norm = PackedWeight(jnp.asarray(norm))

  @property
  def out_dim(self) -> int:
    return packed_cols(self.packed[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.apply(x, *self.params())

  def params(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.packed[...], self.scale[...], self.norm[...]

  def apply(self, x: jax.Array, packed: jax.Array, scale: jax.Array,
            norm: jax.Array) -> jax.Array:
    """This layer's op on explicit arrays (the same interface as `BitLinear.apply`)."""
    dt = DTYPES[self.compute_dtype]
    xq, s_x = absmax_quantize(rms_norm_reference(x.astype(jnp.float32), norm, self.eps))
    y = packed_matmul(xq, packed, implementation=self.implementation)
    return (y.astype(jnp.float32) * (scale / s_x)).astype(dt)


def pack_bitlinears(module: nnx.Module, *, implementation=None) -> int:
  """Replaces every BitLinear inside `module` (in place) by its packed form; returns the count."""
  count = 0
  children = (list(enumerate(module)) if isinstance(module, nnx.List)
              else list(vars(module).items()))
  for name, child in children:
    if isinstance(child, BitLinear):
      packed = child.pack(implementation=implementation)
      if isinstance(module, nnx.List):
        module[name] = packed
      else:
        setattr(module, name, packed)
      count += 1
    elif isinstance(child, nnx.Module | nnx.List):
      count += pack_bitlinears(child, implementation=implementation)
  return count
