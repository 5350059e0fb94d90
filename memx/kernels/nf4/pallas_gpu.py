"""Pallas (Triton) NF4 matmul: the weight crosses HBM as 4-bit codes (plus one float32 absmax
per 64 weights) and is dequantized in registers; no full-precision copy of it is ever written.

Forward, grid (M / block_m, N / block_n): a program owns a [block_m, block_n] output tile and
walks K in steps of bk (`k_step`). Each step loads bk/2 packed rows of its columns (uint8: two
codes per byte) and the absmax rows they belong to, and for each nibble plane (low = even rows
2j, high = odd rows 2j+1) decodes code → level with a tree of selects on the code's 4 bits
(15 selects of constants, all in registers; no table lookup), multiplies by the absmax rows,
rounds to x's dtype and accumulates x[:, plane columns] @ plane on the tensor cores into a
float32 [block_m, block_n] accumulator (fp32 because a K of thousands of bf16 products would
lose the low bits; fp32 x runs full-precision dots, not TF32). x is passed with its columns
permuted into planes, [M, 2, K/2] viewed as [M, K] (one XLA copy of the activations, small
next to the weight), so each plane's columns are one contiguous slice.
  A step covers whole quantization blocks (bk a multiple of block_size: the absmax rows are
  broadcast over their block_size/2 packed rows) or lies inside one (block_size a multiple of
  bk: one absmax row for the whole step).

Backward (dx = dy @ W̃ᵀ), grid (M / block_m, K / bk): a program owns dx's [block_m, bk] columns
(as an even and an odd plane of bk/2 columns each) and walks N in steps of block_n, decoding the
same [bk/2, block_n] weight tiles and accumulating dy_tile @ planeᵀ in float32. The planes are
interleaved back into dx by XLA. The base is frozen: codes and absmax get no cotangent (None).

M and N are padded to the tiles (zero rows; zero absmax columns, which decode to zero weights),
and the padding is sliced off. The N tile is the largest power of two <= block_n dividing N
(`n_tile`), so only an N that is not a multiple of 16 pads, which copies the packed codes on
every call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memx.kernels.nf4.config import BlockSizes
from memx.kernels.nf4.reference import NF4_LEVELS
from memx.typing import Array

_LEVELS = tuple(float(v) for v in NF4_LEVELS)
MIN_K_STEP = 32  # bk / 2 = 16 packed rows: the smallest Triton dot dimension


def _pow2_at_least(x: int, lo: int) -> int:
  return max(lo, 1 << max(0, x - 1).bit_length())


def n_tile(n: int, block_n: int) -> int:
  """The N tile: the largest power of two in [16, block_n] dividing N (no padding of the
  codes), else block_n shrunk to the padded N."""
  bn = block_n
  while bn >= 16:
    if n % bn == 0:
      return bn
    bn //= 2
  return min(block_n, _pow2_at_least(n, 16))


def k_step(k: int, block_size: int, block_k: int) -> int | None:
  """The kernels' K step: the largest power of two in [MIN_K_STEP, block_k] that divides K and
  divides block_size or is a multiple of it; None when there is none."""
  bk = block_k
  while bk >= MIN_K_STEP:
    if k % bk == 0 and (bk % block_size == 0 or block_size % bk == 0):
      return bk
    bk //= 2
  return None


def unsupported_reason(k: int, block_size: int, block_sizes: BlockSizes | None) -> str | None:
  """Why the kernels cannot serve K and block_size (valid inputs), or None."""
  bs = block_sizes or BlockSizes.get_default()
  if k_step(k, block_size, bs.block_k) is None:
    return (f"K = {k} with block_size = {block_size} has no K step: a power of two in "
            f"[{MIN_K_STEP}, block_k = {bs.block_k}] that divides K and divides block_size or is a "
            f"multiple of it (use a power-of-two block_size, or K a multiple of {MIN_K_STEP})")
  return None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  m: int
  k: int
  n: int
  block_size: int
  bm: int
  bn: int
  bk: int
  num_warps: int
  num_stages: int
  interpret: bool

  @property
  def mp(self) -> int:
    return -(-self.m // self.bm) * self.bm

  @property
  def np_(self) -> int:
    return -(-self.n // self.bn) * self.bn

  @property
  def absmax_rows(self) -> int:
    """absmax rows one K step reads: its blocks, or the one block it lies in."""
    return max(1, self.bk // self.block_size)

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _decode(codes):
  """NF4 level (float32) of each 4-bit code (uint8): a binary tree of selects on bits 0..3 of
  the code over the 16 constants, all in registers."""
  vals = [jnp.float32(v) for v in _LEVELS]
  for bit in range(4):
    on = (codes & jnp.uint8(1 << bit)) != 0
    vals = [jnp.where(on, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
  return vals[0]


def _planes(plan: _Plan, packed, a, dtype):
  """(even-row, odd-row) weight planes [bk/2, bn] in dtype from packed codes [bk/2, bn] and the
  step's absmax rows a [absmax_rows, bn]."""
  bk2, bn = packed.shape
  if plan.absmax_rows > 1:  # several blocks: each absmax row covers block_size/2 packed rows
    nb = plan.absmax_rows
    a = jnp.broadcast_to(a[:, None, :], (nb, plan.block_size // 2, bn)).reshape(bk2, bn)
  lo = (_decode(packed & jnp.uint8(15)) * a).astype(dtype)
  hi = (_decode(packed >> jnp.uint8(4)) * a).astype(dtype)
  return lo, hi


def _dot(a, b, *, trans_b: bool = False):
  """fp32-accumulated dot; fp32 operands in full precision (Triton's default is TF32)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def _fwd_kernel(x_ref, c_ref, a_ref, o_ref, *, plan: _Plan):
  """x_ref [bm, K] (plane-permuted x); c_ref [K/2, bn] uint8; a_ref [K/block_size, bn] f32;
  o_ref [bm, bn]."""
  bk2 = plan.bk // 2
  half = plan.k // 2
  dt = x_ref.dtype

  def step(s, acc):
    j0 = s * bk2
    packed = c_ref[pl.ds(j0, bk2), :]
    if plan.bk >= plan.block_size:
      a = a_ref[pl.ds(s * plan.absmax_rows, plan.absmax_rows), :]
    else:  # the step lies inside block (s · bk) // block_size
      a = a_ref[pl.ds((s * plan.bk) // plan.block_size, 1), :]
    lo, hi = _planes(plan, packed, a, dt)
    acc = acc + _dot(x_ref[:, pl.ds(j0, bk2)], lo)
    return acc + _dot(x_ref[:, pl.ds(half + j0, bk2)], hi)

  acc = jax.lax.fori_loop(0, plan.k // plan.bk, step, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_kernel(g_ref, c_ref, a_ref, de_ref, do_ref, *, plan: _Plan):
  """g_ref [bm, Np] (dy); c_ref [bk/2, Np] uint8; a_ref [absmax_rows, Np] f32;
  de_ref / do_ref [bm, bk/2]: dx at the step's even / odd rows of W̃."""
  dt = g_ref.dtype

  def step(t, carry):
    de, do = carry
    cols = pl.ds(t * plan.bn, plan.bn)
    lo, hi = _planes(plan, c_ref[:, cols], a_ref[:, cols], dt)
    g = g_ref[:, cols]
    return de + _dot(g, lo, trans_b=True), do + _dot(g, hi, trans_b=True)

  zeros = jnp.zeros(de_ref.shape, jnp.float32)
  de, do = jax.lax.fori_loop(0, plan.np_ // plan.bn, step, (zeros, zeros))
  de_ref[...] = de.astype(de_ref.dtype)
  do_ref[...] = do.astype(do_ref.dtype)


def _pad_weight(plan: _Plan, codes, absmax):
  """Columns padded to the N tiles: code 0 with absmax 0 is a zero weight."""
  pad = plan.np_ - plan.n
  if pad == 0:
    return codes, absmax
  return jnp.pad(codes, ((0, 0), (0, pad))), jnp.pad(absmax, ((0, 0), (0, pad)))


def _forward(plan: _Plan, x, codes, absmax):
  half = plan.k // 2
  # Plane-permuted activations: columns [0, K/2) are x's even columns, [K/2, K) its odd ones.
  xp = jnp.swapaxes(x.reshape(plan.m, half, 2), 1, 2).reshape(plan.m, plan.k)
  xp = jnp.pad(xp, ((0, plan.mp - plan.m), (0, 0)))
  cp, ap = _pad_weight(plan, codes, absmax)
  y = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan),
      out_shape=jax.ShapeDtypeStruct((plan.mp, plan.np_), x.dtype),
      grid=(plan.mp // plan.bm, plan.np_ // plan.bn),
      in_specs=[pl.BlockSpec((plan.bm, plan.k), lambda i, j: (i, 0)),
                pl.BlockSpec((half, plan.bn), lambda i, j: (0, j)),
                pl.BlockSpec((plan.k // plan.block_size, plan.bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((plan.bm, plan.bn), lambda i, j: (i, j)),
      compiler_params=plan.params(),
      interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * plan.mp * plan.np_ * plan.k, transcendentals=0,
          bytes_accessed=int(xp.nbytes * (plan.np_ // plan.bn) + cp.nbytes * (plan.mp // plan.bm)
                             + ap.nbytes * (plan.mp // plan.bm) + plan.mp * plan.np_
                             * x.dtype.itemsize)),
      name="memx_nf4_matmul",
  )(xp, cp, ap)
  return y[:plan.m, :plan.n]


def _dx(plan: _Plan, dy, codes, absmax):
  half, bk2 = plan.k // 2, plan.bk // 2
  g = jnp.pad(dy, ((0, plan.mp - plan.m), (0, plan.np_ - plan.n)))
  cp, ap = _pad_weight(plan, codes, absmax)
  if plan.bk >= plan.block_size:
    a_spec = pl.BlockSpec((plan.absmax_rows, plan.np_), lambda i, s: (s, 0))
  else:  # the program's columns lie inside one quantization block
    a_spec = pl.BlockSpec((1, plan.np_), lambda i, s: ((s * plan.bk) // plan.block_size, 0))
  plane = jax.ShapeDtypeStruct((plan.mp, half), dy.dtype)
  de, do = pl.pallas_call(
      functools.partial(_dx_kernel, plan=plan),
      out_shape=(plane, plane),
      grid=(plan.mp // plan.bm, plan.k // plan.bk),
      in_specs=[pl.BlockSpec((plan.bm, plan.np_), lambda i, s: (i, 0)),
                pl.BlockSpec((bk2, plan.np_), lambda i, s: (s, 0)),
                a_spec],
      out_specs=(pl.BlockSpec((plan.bm, bk2), lambda i, s: (i, s)),
                 pl.BlockSpec((plan.bm, bk2), lambda i, s: (i, s))),
      compiler_params=plan.params(),
      interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * plan.mp * plan.np_ * plan.k, transcendentals=0,
          bytes_accessed=int(g.nbytes * (plan.k // plan.bk) + (cp.nbytes + ap.nbytes)
                             * (plan.mp // plan.bm) + plan.mp * plan.k * dy.dtype.itemsize)),
      name="memx_nf4_matmul_dx",
  )(g, cp, ap)
  return jnp.stack([de, do], axis=-1).reshape(plan.mp, plan.k)[:plan.m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nf4(plan: _Plan, x, codes, absmax):
  return _forward(plan, x, codes, absmax)


def _nf4_fwd(plan, x, codes, absmax):
  return _forward(plan, x, codes, absmax), (codes, absmax)


def _nf4_bwd(plan, res, dy):
  codes, absmax = res
  return _dx(plan, dy, codes, absmax), None, None


_nf4.defvjp(_nf4_fwd, _nf4_bwd)


def make_plan(m: int, k: int, n: int, block_size: int, block_sizes: BlockSizes | None,
              interpret: bool) -> _Plan:
  """Fixes the tiles (no tracing); raises NotImplementedError when K has no K step."""
  bs = block_sizes or BlockSizes.get_default("pallas_gpu", rows=m)
  bk = k_step(k, block_size, bs.block_k)
  if bk is None:
    raise NotImplementedError(f"nf4_matmul_pallas_gpu: {unsupported_reason(k, block_size, bs)}")
  return _Plan(m=m, k=k, n=n, block_size=block_size,
               bm=min(bs.block_m, _pow2_at_least(m, 16)), bn=n_tile(n, bs.block_n),
               bk=bk, num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret)


def nf4_matmul_pallas_gpu(x: Array, codes: Array, absmax: Array, *, block_size: int,
                          block_sizes: BlockSizes | None = None, interpret: bool = False) -> Array:
  """x [M, K] float @ W̃ (codes uint8 [K/2, N], absmax float32 [K/block_size, N]) → [M, N] in
  x.dtype, float32 accumulation. Differentiable in x (hand-written dx kernel); codes and absmax
  get no cotangent. Any M and N; K needs a K step (`unsupported_reason`)."""
  m, k = x.shape
  n = codes.shape[1]
  if m == 0:  # no rows: nothing to launch (a zero-sized grid is not a valid Triton launch)
    return jnp.zeros((0, n), x.dtype)
  plan = make_plan(m, k, n, block_size, block_sizes, interpret)
  return _nf4(plan, x, codes, absmax)
