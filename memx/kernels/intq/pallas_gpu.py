"""Pallas (Triton) integer-weight matmul: the weight crosses HBM as packed 2/3/4/8-bit codes (plus
a float32 scale and zero per group) and is dequantized in registers; no full-precision copy of
it is ever written.

Layout: per = 4, 2, 2, 1 codes per byte (bits 2, 3, 4, 8; 3-bit codes sit in 4-bit containers).
Byte j of a column holds rows per·j + r in its r-th container, so the packed array splits into
`per` planes: plane r = (packed >> r·container) & mask holds rows per·j + r.

Forward, grid (M / block_m, N / block_n): a program owns a [block_m, block_n] output tile and
walks K in steps of bk rows (`k_step`). Each step loads bk/per packed rows of its columns
(uint8) and the scale and zero rows of their groups, and for each plane decodes
(code − zero) · scale in float32 (one shift, one mask, one convert, a subtract and a multiply:
the same float32 arithmetic as the reference, so the weights match it bit for bit), rounds to
x's dtype and accumulates x[:, plane columns] @ plane on the tensor cores into a float32
[block_m, block_n] accumulator (float32 because a K of thousands of bf16 products would lose the
low bits; float32 x runs full-precision dots, not TF32). x is passed with its columns permuted
into planes, [M, per, K/per] viewed as [M, K] (one XLA copy of the activations, small next to
the weight), so each plane's columns are one contiguous slice.
  A step covers whole groups (bk a multiple of group_size: each scale row is broadcast over its
group_size/per packed rows) or lies inside one (group_size a multiple of bk: one scale row for
the whole step); group_size = K (one group per column) is the second case.

Backward (dx = dy @ W̃ᵀ), grid (M / block_m, K / bk): a program owns dx's [block_m, bk] columns
(as `per` planes of bk/per columns) and walks N in steps of block_n, decoding the same
[bk/per, block_n] weight tiles and accumulating dy_tile @ planeᵀ in float32. The planes are
interleaved back into dx by XLA. The base is frozen: the stored arrays get no cotangent (None).

M and N are padded to the tiles (zero rows; zero scale columns, which decode to zero weights),
and the padding is sliced off. The N tile is the largest power of two <= block_n dividing N
(`n_tile`), so only an N that is not a multiple of 16 pads, which copies the stored arrays on
every call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memx.kernels.intq.config import BlockSizes
from memx.kernels.intq.reference import codes_per_byte, container_bits
from memx.typing import Array

MIN_DOT = 16  # the smallest Triton dot dimension: a step feeds bk/per packed rows to a dot


def _pow2_at_least(x: int, lo: int) -> int:
  return max(lo, 1 << max(0, x - 1).bit_length())


def n_tile(n: int, block_n: int) -> int:
  """The N tile: the largest power of two in [16, block_n] dividing N (no padding of the
  stored arrays), else block_n shrunk to the padded N."""
  bn = block_n
  while bn >= 16:
    if n % bn == 0:
      return bn
    bn //= 2
  return min(block_n, _pow2_at_least(n, 16))


def min_k_step(bits: int) -> int:
  """16·per rows: a step's bk/per packed rows must fill a Triton dot dimension."""
  return MIN_DOT * codes_per_byte(bits)


def k_step(k: int, group_size: int, bits: int, block_k: int) -> int | None:
  """The kernels' K step: the largest power of two in [16·per, block_k] that divides K and
  divides group_size or is a multiple of it; None when there is none."""
  bk = block_k
  while bk >= min_k_step(bits):
    if k % bk == 0 and (bk % group_size == 0 or group_size % bk == 0):
      return bk
    bk //= 2
  return None


def unsupported_reason(k: int, group_size: int, bits: int,
                       block_sizes: BlockSizes | None) -> str | None:
  """Why the kernels cannot serve K, group_size and bits (valid inputs), or None."""
  bs = block_sizes or BlockSizes.get_default()
  if k_step(k, group_size, bits, bs.block_k) is None:
    lo = min_k_step(bits)
    return (f"K = {k} with group_size = {group_size} at bits = {bits} has no K step: a power of "
            f"two in [{lo}, block_k = {bs.block_k}] that divides K and divides group_size or is a "
            f"multiple of it (use a power-of-two group_size, or K a multiple of {lo}, or "
            f"block_k >= {lo})")
  return None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  m: int
  k: int
  n: int
  bits: int
  group_size: int
  bm: int
  bn: int
  bk: int
  num_warps: int
  num_stages: int
  interpret: bool

  @property
  def per(self) -> int:
    return codes_per_byte(self.bits)

  @property
  def bkp(self) -> int:
    """Packed rows per step (per plane)."""
    return self.bk // self.per

  @property
  def mp(self) -> int:
    return -(-self.m // self.bm) * self.bm

  @property
  def np_(self) -> int:
    return -(-self.n // self.bn) * self.bn

  @property
  def group_rows(self) -> int:
    """Scale rows one K step reads: its groups, or the one group it lies in."""
    return max(1, self.bk // self.group_size)

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _planes(plan: _Plan, packed, s, z, dtype):
  """The `per` weight planes [bk/per, bn] in dtype from packed codes [bk/per, bn] and the step's
  scale and zero rows [group_rows, bn]."""
  bkp, bn = packed.shape
  if plan.group_rows > 1:  # several groups: each row covers group_size/per packed rows
    nb, rows = plan.group_rows, plan.group_size // plan.per
    s = jnp.broadcast_to(s[:, None, :], (nb, rows, bn)).reshape(bkp, bn)
    z = jnp.broadcast_to(z[:, None, :], (nb, rows, bn)).reshape(bkp, bn)
  c = container_bits(plan.bits)
  mask = jnp.uint8((1 << c) - 1)
  out = []
  for r in range(plan.per):
    code = packed if plan.per == 1 else (packed >> jnp.uint8(r * c)) & mask
    out.append(((code.astype(jnp.float32) - z) * s).astype(dtype))
  return out


def _dot(a, b, *, trans_b: bool = False):
  """fp32-accumulated dot; fp32 operands in full precision (Triton's default is TF32)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def _fwd_kernel(x_ref, c_ref, s_ref, z_ref, o_ref, *, plan: _Plan):
  """x_ref [bm, K] (plane-permuted x); c_ref [K/per, bn] uint8; s_ref, z_ref [K/group_size, bn]
  f32; o_ref [bm, bn]."""
  bkp = plan.bkp
  half = plan.k // plan.per
  dt = x_ref.dtype

  def step(t, acc):
    j0 = t * bkp
    packed = c_ref[pl.ds(j0, bkp), :]
    if plan.bk >= plan.group_size:
      rows = pl.ds(t * plan.group_rows, plan.group_rows)
    else:  # the step lies inside group (t · bk) // group_size
      rows = pl.ds((t * plan.bk) // plan.group_size, 1)
    planes = _planes(plan, packed, s_ref[rows, :], z_ref[rows, :], dt)
    for r, w in enumerate(planes):
      acc = acc + _dot(x_ref[:, pl.ds(r * half + j0, bkp)], w)
    return acc

  acc = jax.lax.fori_loop(0, plan.k // plan.bk, step, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_kernel(g_ref, c_ref, s_ref, z_ref, *out_refs, plan: _Plan):
  """g_ref [bm, Np] (dy); c_ref [bk/per, Np] uint8; s_ref, z_ref [group_rows, Np] f32;
  out_refs: `per` refs [bm, bk/per], dx at the step's rows per·j + r of W̃."""
  dt = g_ref.dtype

  def step(t, accs):
    cols = pl.ds(t * plan.bn, plan.bn)
    planes = _planes(plan, c_ref[:, cols], s_ref[:, cols], z_ref[:, cols], dt)
    g = g_ref[:, cols]
    return tuple(a + _dot(g, w, trans_b=True) for a, w in zip(accs, planes, strict=True))

  zeros = tuple(jnp.zeros(out_refs[0].shape, jnp.float32) for _ in range(plan.per))
  accs = jax.lax.fori_loop(0, plan.np_ // plan.bn, step, zeros)
  for ref, acc in zip(out_refs, accs, strict=True):
    ref[...] = acc.astype(ref.dtype)


def _pad_weight(plan: _Plan, packed, scales, zeros):
  """Columns padded to the N tiles: code 0 with scale 0 and zero 0 is a zero weight."""
  pad = plan.np_ - plan.n
  if pad == 0:
    return packed, scales, zeros
  return tuple(jnp.pad(a, ((0, 0), (0, pad))) for a in (packed, scales, zeros))


def _forward(plan: _Plan, x, packed, scales, zeros):
  half = plan.k // plan.per
  # Plane-permuted activations: columns [r·K/per, (r+1)·K/per) are x's columns per·j + r.
  xp = jnp.swapaxes(x.reshape(plan.m, half, plan.per), 1, 2).reshape(plan.m, plan.k)
  xp = jnp.pad(xp, ((0, plan.mp - plan.m), (0, 0)))
  cp, sp, zp = _pad_weight(plan, packed, scales, zeros)
  groups = plan.k // plan.group_size
  param_spec = pl.BlockSpec((groups, plan.bn), lambda i, j: (0, j))
  y = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan),
      out_shape=jax.ShapeDtypeStruct((plan.mp, plan.np_), x.dtype),
      grid=(plan.mp // plan.bm, plan.np_ // plan.bn),
      in_specs=[pl.BlockSpec((plan.bm, plan.k), lambda i, j: (i, 0)),
                pl.BlockSpec((half, plan.bn), lambda i, j: (0, j)),
                param_spec, param_spec],
      out_specs=pl.BlockSpec((plan.bm, plan.bn), lambda i, j: (i, j)),
      compiler_params=plan.params(),
      interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * plan.mp * plan.np_ * plan.k, transcendentals=0,
          bytes_accessed=int(xp.nbytes * (plan.np_ // plan.bn)
                             + (cp.nbytes + sp.nbytes + zp.nbytes) * (plan.mp // plan.bm)
                             + plan.mp * plan.np_ * x.dtype.itemsize)),
      name="memx_intq_matmul",
  )(xp, cp, sp, zp)
  return y[:plan.m, :plan.n]


def _dx(plan: _Plan, dy, packed, scales, zeros):
  half, bkp = plan.k // plan.per, plan.bkp
  g = jnp.pad(dy, ((0, plan.mp - plan.m), (0, plan.np_ - plan.n)))
  cp, sp, zp = _pad_weight(plan, packed, scales, zeros)
  if plan.bk >= plan.group_size:
    param_spec = pl.BlockSpec((plan.group_rows, plan.np_), lambda i, t: (t, 0))
  else:  # the program's columns lie inside one group
    param_spec = pl.BlockSpec((1, plan.np_), lambda i, t: ((t * plan.bk) // plan.group_size, 0))
  plane = jax.ShapeDtypeStruct((plan.mp, half), dy.dtype)
  planes = pl.pallas_call(
      functools.partial(_dx_kernel, plan=plan),
      out_shape=(plane,) * plan.per,
      grid=(plan.mp // plan.bm, plan.k // plan.bk),
      in_specs=[pl.BlockSpec((plan.bm, plan.np_), lambda i, t: (i, 0)),
                pl.BlockSpec((bkp, plan.np_), lambda i, t: (t, 0)),
                param_spec, param_spec],
      out_specs=tuple(pl.BlockSpec((plan.bm, bkp), lambda i, t: (i, t))
                      for _ in range(plan.per)),
      compiler_params=plan.params(),
      interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * plan.mp * plan.np_ * plan.k, transcendentals=0,
          bytes_accessed=int(g.nbytes * (plan.k // plan.bk)
                             + (cp.nbytes + sp.nbytes + zp.nbytes) * (plan.mp // plan.bm)
                             + plan.mp * plan.k * dy.dtype.itemsize)),
      name="memx_intq_matmul_dx",
  )(g, cp, sp, zp)
  return jnp.stack(planes, axis=-1).reshape(plan.mp, plan.k)[:plan.m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _intq(plan: _Plan, x, packed, scales, zeros):
  return _forward(plan, x, packed, scales, zeros)


def _intq_fwd(plan, x, packed, scales, zeros):
  return _forward(plan, x, packed, scales, zeros), (packed, scales, zeros)


def _intq_bwd(plan, res, dy):
  packed, scales, zeros = res
  return _dx(plan, dy, packed, scales, zeros), None, None, None


_intq.defvjp(_intq_fwd, _intq_bwd)


def make_plan(m: int, k: int, n: int, bits: int, group_size: int,
              block_sizes: BlockSizes | None, interpret: bool) -> _Plan:
  """Fixes the tiles (no tracing); raises NotImplementedError when K has no K step."""
  bs = block_sizes or BlockSizes.get_default("pallas_gpu", rows=m)
  bk = k_step(k, group_size, bits, bs.block_k)
  if bk is None:
    raise NotImplementedError(
        f"intq_matmul_pallas_gpu: {unsupported_reason(k, group_size, bits, bs)}")
  return _Plan(m=m, k=k, n=n, bits=bits, group_size=group_size,
               bm=min(bs.block_m, _pow2_at_least(m, 16)), bn=n_tile(n, bs.block_n), bk=bk,
               num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret)


def intq_matmul_pallas_gpu(x: Array, packed: Array, scales: Array, zeros: Array, *, bits: int,
                           group_size: int, block_sizes: BlockSizes | None = None,
                           interpret: bool = False) -> Array:
  """x [M, K] float @ W̃ (packed uint8 [K·container/8, N], scales and zeros float32
  [K/group_size, N]) → [M, N] in x.dtype, float32 accumulation. Differentiable in x
  (hand-written dx kernel); the stored arrays get no cotangent. Any M and N; K needs a K step
  (`unsupported_reason`)."""
  m, k = x.shape
  n = packed.shape[1]
  if m == 0:  # no rows: nothing to launch (a zero-sized grid is not a valid Triton launch)
    return jnp.zeros((0, n), x.dtype)
  plan = make_plan(m, k, n, bits, group_size, block_sizes, interpret)
  return _intq(plan, x, packed, scales, zeros)
