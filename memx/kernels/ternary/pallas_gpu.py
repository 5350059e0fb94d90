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

Vector form (`BlockSizes.vector`, the decode default): at a few rows a tensor-core dot wastes
its 16-row minimum, and the [M, 4·Kp] permuted activation costs an XLA kernel per call. Instead
a program takes one activation row and a column tile, reads x in place and multiply-adds on the
CUDA cores, where the decode itself is the cost: instructions per weight decide the speed.
- int8 x: the weight tile is loaded as 4 strided column sets and paired into int32 words,
  columns 4c and 4c+2 in one (16-bit lanes), 4c+1 and 4c+3 in another. Per plane i,
  (word >> 2i) & 0x00030003 holds both columns' codes, and one int32 multiply by x's plane value
  adds x·code into both lanes at once (the low lane's sign borrows from the high
  lane; it is undone exactly when the lanes are split, every K step: 4 terms of |x·code| <= 256
  per lane stay far inside 16 bits). Offline SASS (`scripts/ptxas_report.py --sass`): ~3.9
  instructions per weight in the loop, against ~6.6 for the dot form's byte unpacking.
- float x: codes are taken without an int→float conversion (a quarter-rate instruction):
  OR-ing the masked bits code·4^i into the mantissa of 2^23 and subtracting 2^23 gives code·4^i
  exactly, and x is pre-scaled by 4^-i (a power of two: exact).
Both use the codes as stored, {0, 1, 2} = w + 1, and subtract Σ x once at the end
(Σ x·w = Σ x·code − Σ x).
- Weights as int32 words (`to_words`, what PackedBitLinear serves from): the int8 path loads one
  word per 4 columns and pairs the lanes with two masks and a shift, instead of 4 strided byte
  loads, 4 conversions and 2 shift-adds. Offline SASS (sm_90a, 64 x 256 tiles): 2.35
  instructions per weight in the loop against 3.07, and 14 load instructions against 68.

Inference only: the packed weights are integers and have no gradient; training differentiates
the latent weights through the fake-quantized forward (memx.nn.bitlinear).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from memx.kernels.ternary.config import BlockSizes
from memx.kernels.ternary.reference import ZERO_BYTE, from_words
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


_MAGIC = 0x4B000000  # float32 bits of 2^23: OR-ing an integer c < 2^23 in gives 2^23 + c
_LANES = 0x00030003  # one plane's 2-bit codes of byte columns 0 and 2 (16-bit lanes)


def _split_lanes(acc):
  """int32 lanes (high·2^16 + low, both signed) → (low, high), exactly."""
  low = (acc << 16) >> 16  # arithmetic: sign-extends the low lane
  return low, (acc - low) >> 16


def _slice_steps(steps: int, per_slice: int):
  """This program's K steps [lo, hi): slice s of the K loop, the last one possibly shorter."""
  lo = pl.program_id(2) * per_slice
  return lo, jnp.minimum(lo + per_slice, steps)


def _paired_lanes(w_ref, start, bk4: int, words: bool):
  """The weight tile paired into 16-bit lanes: (even, odd) int32 [bk4, bn/4], even holding
  byte columns 4c (low lane) and 4c+2 (high), odd 4c+1 and 4c+3."""
  if words:  # one 32-bit load per 4 columns; the pairing is two masks and a shift
    word = w_ref[pl.ds(start, bk4), :]
    return word & 0x00FF00FF, (word >> 8) & 0x00FF00FF
  # Bytes: 4 strided column sets (byte columns 4c + l: one 128-byte line per warp load).
  # (Reinterpreting the bytes as int32 outside the kernel is an XLA copy, not a view: pass
  # words, made once with `to_words`, to skip this.)
  bn4 = w_ref.shape[1] // 4
  cols = [w_ref[pl.ds(start, bk4), pl.ds(lane, bn4, stride=4)].astype(jnp.int32)
          for lane in range(4)]
  return cols[0] + (cols[2] << 16), cols[1] + (cols[3] << 16)


def _vector_int_kernel(x_ref, w_ref, o_ref, *, bk4: int, steps: int, per_slice: int,
                       words: bool):
  """x_ref [1, 4·kp] int8; w_ref [kp, bn] uint8 or [kp, bn/4] int32 words; o_ref [1, bn]
  int32."""
  bn4 = o_ref.shape[1] // 4

  def body(kk, carry):
    c0, c1, c2, c3, xsum = carry
    start = kk * bk4
    even_w, odd_w = _paired_lanes(w_ref, start, bk4, words)
    even = odd = jnp.zeros_like(even_w)
    for i in range(4):
      xi = x_ref[:, pl.ds(4 * start + i, bk4, stride=4)][0].astype(jnp.int32)
      xsum = xsum + xi
      xi = xi[:, None]
      even = even + xi * ((even_w >> (2 * i)) & _LANES)
      odd = odd + xi * ((odd_w >> (2 * i)) & _LANES)
    lo, hi = _split_lanes(even)
    c0, c2 = c0 + lo, c2 + hi
    lo, hi = _split_lanes(odd)
    c1, c3 = c1 + lo, c3 + hi
    return c0, c1, c2, c3, xsum

  zeros = jnp.zeros((bk4, bn4), jnp.int32)
  *cols, xsum = jax.lax.fori_loop(*_slice_steps(steps, per_slice), body,
                                  (zeros, zeros, zeros, zeros, jnp.zeros((bk4,), jnp.int32)))
  total = jnp.sum(xsum, axis=0)
  for lane, c in enumerate(cols):  # column 4c + lane of the tile
    o_ref[:, pl.ds(lane, bn4, stride=4)] = (jnp.sum(c, axis=0) - total)[None]


def _float_codes(bits, i: int):
  """code·4^i as float32 from int32 bits holding the 2-bit code at bits 2i..2i+1 (and others):
  masked into the mantissa of 2^23, then 2^23 subtracted, exactly."""
  bits = (bits & (3 << (2 * i))) | _MAGIC
  return jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(2.0**23)


def _vector_float_kernel(x_ref, w_ref, o_ref, *, bk4: int, steps: int, per_slice: int,
                         words: bool):
  """x_ref [1, 4·kp] float; w_ref [kp, bn] uint8 or [kp, bn/4] int32 words; o_ref [1, bn]
  float32."""
  bn = o_ref.shape[1]
  # Words: one accumulator per byte lane l (columns 4c + l), fed by (word >> 8l).
  sets = 4 if words else 1

  def body(kk, carry):
    *acc, xsum = carry
    start = kk * bk4
    if words:
      word = w_ref[pl.ds(start, bk4), :]
      lanes = [word >> (8 * lane) for lane in range(4)]
    else:
      lanes = [w_ref[pl.ds(start, bk4), :].astype(jnp.int32)]  # the only weight load
    for i in range(4):
      xi = x_ref[:, pl.ds(4 * start + i, bk4, stride=4)][0].astype(jnp.float32)
      xsum = xsum + xi
      xs = (xi * jnp.float32(4.0**-i))[:, None]
      acc = [a + xs * _float_codes(bits, i) for a, bits in zip(acc, lanes, strict=True)]
    return *acc, xsum

  zeros = jnp.zeros((bk4, bn // sets), jnp.float32)
  *acc, xsum = jax.lax.fori_loop(*_slice_steps(steps, per_slice), body,
                                 (*(zeros,) * sets, jnp.zeros((bk4,), jnp.float32)))
  total = jnp.sum(xsum, axis=0)
  if not words:
    o_ref[...] = (jnp.sum(acc[0], axis=0) - total)[None]
    return
  for lane, a in enumerate(acc):
    o_ref[:, pl.ds(lane, bn // 4, stride=4)] = (jnp.sum(a, axis=0) - total)[None]


def packed_matmul_pallas_gpu(x: Array, packed: Array, *, block_sizes: BlockSizes | None = None,
                             interpret: bool = False) -> Array:
  """x [M, K] (int8 or float) @ unpack(packed [⌈K/4⌉, N]) → int32 or float32 [M, N].

  packed: uint8 bytes [⌈K/4⌉, N] or int32 words [⌈K/4⌉, N/4] (`to_words`). The vector form
  loads words directly; the dot form takes bytes, so words are split back into bytes for it
  (one XLA op per call: prefill-sized calls, where the dot's work dwarfs it).
  M, N and the packed rows are padded to the tiles (zero activations, zero-weight bytes), so
  any shape is served; padding is sliced off the result.
  """
  m, k = x.shape
  bs = block_sizes or BlockSizes.get_default("pallas_gpu", rows=m)
  words = packed.dtype == jnp.int32 and bs.vector
  if packed.dtype == jnp.int32 and not bs.vector:
    packed = from_words(packed)
  kp0, n = packed.shape[0], packed.shape[1] * (4 if words else 1)
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  if m == 0:  # no rows: nothing to launch (a zero-sized grid is not a valid Triton launch)
    return jnp.zeros((0, n), jnp.int32 if integer else jnp.float32)
  bk4 = bs.block_k // 4
  kp = _round_up(kp0, bk4)
  steps = kp // bk4
  np_ = _round_up(n, bs.block_n)
  col = 4 if words else 1  # output columns per weight element
  zero = int(np.uint32(ZERO_BYTE * 0x01010101).view(np.int32)) if words else ZERO_BYTE
  wp = jnp.pad(packed, ((0, kp - kp0), (0, (np_ - n) // col)), constant_values=zero)
  if bs.vector:  # one row per program, x read in place
    tm, mp = 1, m
    xp = jnp.pad(x, ((0, 0), (0, 4 * kp - k)))
    # K slices need not divide the steps (K = 11008: 43 steps of 64 packed rows): each program
    # walks its own range of the whole weight, the last range shorter.
    per_slice = -(-steps // min(bs.split_k, steps))
    split = -(-steps // per_slice)
    w_rows = kp  # the weight rows one program's BlockSpec covers
    vector_kernel = _vector_int_kernel if integer else _vector_float_kernel
    kernel = functools.partial(vector_kernel, bk4=bk4, steps=steps, per_slice=per_slice,
                               words=words)
  else:
    # The K slices split the K steps evenly: the largest power of two <= split_k that divides
    # them, so K is never padded further (a padded weight is a copy of it every call).
    split = math.gcd(bs.split_k, steps)
    w_rows = kp // split
    tm = bs.block_m
    mp = _round_up(m, tm)
    xp = x_planes(x, kp0)  # [M, 4, kp0]
    xp = jnp.pad(xp, ((0, mp - m), (0, 0), (0, kp - kp0))).reshape(mp, 4 * kp)
    kernel = functools.partial(_kernel, kp=kp, bk4=bk4, integer=integer, split=split)
  out_t = jnp.int32 if integer else jnp.float32
  extra = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 - GPU-only module
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=bs.num_warps,
                                                    num_stages=bs.num_stages)
  # Grid (M tiles, N tiles, K slices): with split_k > 1 each slice writes its own partial
  # [M, N] (exact for int32; fp32 partials add in another order than one loop would).
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((split, mp, np_), out_t),
      grid=(mp // tm, np_ // bs.block_n, split),
      in_specs=[pl.BlockSpec((tm, 4 * kp), lambda i, j, s: (i, 0)),
                pl.BlockSpec((w_rows, bs.block_n // col),
                             lambda i, j, s: (0 if bs.vector else s, j))],
      out_specs=pl.BlockSpec((None, tm, bs.block_n), lambda i, j, s: (s, i, j)),
      interpret=interpret,
      name="ternary_packed_matmul_words" if words else "ternary_packed_matmul",
      **extra,
  )(xp, wp)
  out = out[:, :m, :n]
  return out[0] if split == 1 else out.sum(axis=0, dtype=out_t)
