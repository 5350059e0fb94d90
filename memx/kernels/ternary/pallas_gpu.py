"""Pallas (Triton) packed ternary matmul: weights stay 2-bit in memory and are decoded in
registers.

Algorithm: a program owns a [block_m, block_n] output tile (with `split_k` > 1, one K slice of
it: the slices' partial sums are added after the kernel). It walks K in steps of block_k: it
loads block_k / 4 packed rows of its columns (uint8, one byte = 4 weights), and for each of the
four bit planes i decodes ((byte >> 2i) & 3) - 1 into int8 registers and accumulates
x[:, rows 4j + i] @ plane_i on the tensor cores (int8 x int8 → int32 for quantized activations;
x.dtype with fp32 accumulation otherwise). The activation is passed pre-permuted as [M, 4·Kp]
(`xla.x_planes`), so each plane's columns are one contiguous slice. Only the packed bytes cross
HBM: 4x fewer weight bytes than int8, 8x fewer than bf16.

Inference only: the packed weights are integers and have no gradient; training differentiates
the latent weights through the fake-quantized forward (memx.nn.bitlinear).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memx.kernels.ternary.config import BlockSizes
from memx.kernels.ternary.reference import ZERO_BYTE
from memx.kernels.ternary.xla import x_planes
from memx.typing import Array


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _kernel(x_ref, w_ref, o_ref, *, kp: int, bk4: int, integer: bool, split: int):
  acc_t = jnp.int32 if integer else jnp.float32
  bm, bn = o_ref.shape
  kps = kp // split                       # packed rows of this program's K slice
  base = pl.program_id(2) * kps if split > 1 else 0

  def body(kk, acc):
    start = kk * bk4
    packed = w_ref[pl.ds(start, bk4), :]  # [bk4, bn] uint8: the only weight load
    for i in range(4):
      plane = ((packed >> jnp.uint8(2 * i)) & jnp.uint8(3)).astype(jnp.int8) - jnp.int8(1)
      xi = x_ref[:, pl.ds(i * kp + base + start, bk4)]
      w = plane if integer else plane.astype(xi.dtype)
      acc = acc + jnp.dot(xi, w, preferred_element_type=acc_t)
    return acc

  acc = jax.lax.fori_loop(0, kps // bk4, body, jnp.zeros((bm, bn), acc_t))
  o_ref[...] = acc


def packed_matmul_pallas_gpu(x: Array, packed: Array, *, block_sizes: BlockSizes | None = None,
                             interpret: bool = False) -> Array:
  """x [M, K] (int8 or float) @ unpack(packed [⌈K/4⌉, N]) → int32 or float32 [M, N].

  M, N and the packed rows are padded to the tiles (zero activations, zero-weight bytes), so
  any shape is served; padding is sliced off the result.
  """
  m, _ = x.shape
  bs = block_sizes or BlockSizes.get_default("pallas_gpu", rows=m)
  kp0, n = packed.shape
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  bk4 = bs.block_k // 4
  kp = _round_up(kp0, bk4)
  # The K slices split the K steps evenly: the largest power of two <= split_k that divides
  # them, so K is never padded further (a padded weight is a copy of it every call).
  split = math.gcd(bs.split_k, kp // bk4)
  mp, np_ = _round_up(m, bs.block_m), _round_up(n, bs.block_n)
  xp = x_planes(x, kp0)  # [M, 4, kp0]
  xp = jnp.pad(xp, ((0, mp - m), (0, 0), (0, kp - kp0))).reshape(mp, 4 * kp)
  wp = jnp.pad(packed, ((0, kp - kp0), (0, np_ - n)), constant_values=ZERO_BYTE)
  out_t = jnp.int32 if integer else jnp.float32
  kernel = functools.partial(_kernel, kp=kp, bk4=bk4, integer=integer, split=split)
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 - GPU-only module
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=bs.num_warps,
                                                    num_stages=bs.num_stages)
  # Grid (M tiles, N tiles, K slices): with split_k > 1 each slice writes its own partial
  # [M, N] (exact for int32; fp32 partials add in another order than one loop would).
  kps = kp // split
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((split, mp, np_), out_t),
      grid=(mp // bs.block_m, np_ // bs.block_n, split),
      in_specs=[pl.BlockSpec((bs.block_m, 4 * kp), lambda i, j, s: (i, 0)),
                pl.BlockSpec((kps, bs.block_n), lambda i, j, s: (s, j))],
      out_specs=pl.BlockSpec((None, bs.block_m, bs.block_n), lambda i, j, s: (s, i, j)),
      interpret=interpret,
      name="ternary_packed_matmul",
      **extra,
  )(xp, wp)
  out = out[:, :m, :n]
  return out[0] if split == 1 else out.sum(axis=0, dtype=out_t)
