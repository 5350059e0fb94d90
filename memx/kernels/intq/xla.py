"""Integer-weight matmul in plain JAX, chunked over K (any backend): the full-precision weight
never exists.

x @ W̃ = Σ_c x[:, chunk c] @ W̃[chunk c]. A loop over chunks of at most TARGET_CHUNK rows
dequantizes one [chunk, N] slice of W̃ at a time (float32 (code − zero) · scale, rounded to
x.dtype) and adds its product into a float32 [M, N] accumulator, so the largest weight-sized
temporary is [chunk, N]. A chunk is whole groups or lies inside one group (group_size = K, one
group per column, is common for GPTQ). The packed bytes split into `per` planes (plane i: the
rows per·j + i of the bytes j); x is read as the matching columns, Σ_i x[:, per·j + i] @ plane i,
so no chunk is interleaved back into row order.

custom_vjp: the residuals are the (already stored) packed codes, scales and zeros, not x;
dx = dy @ W̃ᵀ is computed chunk by chunk the same way, each chunk writing its own columns of dx.
The stored arrays get no cotangent (None: zeros): the base is frozen.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from memx.kernels.intq.reference import codes_per_byte, dot_f32, unpack_planes
from memx.typing import Array

TARGET_CHUNK = 256  # rows of W̃ dequantized per loop step (fewer when K or group_size decide)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  bits: int
  group_size: int
  chunk: int  # rows per step: divides K; a multiple or a divisor of group_size

  @property
  def per(self) -> int:
    return codes_per_byte(self.bits)


def chunk_ok(chunk: int, k: int, group_size: int, bits: int) -> bool:
  per = codes_per_byte(bits)
  if not isinstance(chunk, int) or isinstance(chunk, bool):
    return False
  return (chunk > 0 and k % chunk == 0 and chunk % per == 0
          and (chunk % group_size == 0 or group_size % chunk == 0))


def chunk_rows(k: int, group_size: int, bits: int, target: int = TARGET_CHUNK) -> int:
  """The largest valid chunk <= max(target, codes per byte): it divides K, holds whole bytes,
  and covers whole groups or lies inside one."""
  top = max(target, codes_per_byte(bits))
  return max(c for c in range(1, min(top, k) + 1) if chunk_ok(c, k, group_size, bits))


def _chunk_planes(plan: _Plan, packed, scales, zeros, i: int | Array, dtype):
  """Chunk i of W̃ as `per` planes [chunk/per, N] in dtype (plane r: the chunk's rows per·j + r)."""
  h = plan.chunk // plan.per
  n = packed.shape[1]
  p = jax.lax.dynamic_slice_in_dim(packed, i * h, h, 0)  # [h, N] uint8
  if plan.chunk >= plan.group_size:  # whole groups: packed row j is in group j // (g / per)
    nb = plan.chunk // plan.group_size
    s = jax.lax.dynamic_slice_in_dim(scales, i * nb, nb, 0)
    z = jax.lax.dynamic_slice_in_dim(zeros, i * nb, nb, 0)
    rows = plan.group_size // plan.per
  else:  # inside group (i · chunk) // group_size
    s = jax.lax.dynamic_slice_in_dim(scales, (i * plan.chunk) // plan.group_size, 1, 0)
    z = jax.lax.dynamic_slice_in_dim(zeros, (i * plan.chunk) // plan.group_size, 1, 0)
    nb, rows = 1, h
  s = jnp.broadcast_to(s[:, None, :], (nb, rows, n)).reshape(h, n)
  z = jnp.broadcast_to(z[:, None, :], (nb, rows, n)).reshape(h, n)
  return [((c.astype(jnp.float32) - z) * s).astype(dtype)
          for c in unpack_planes(p, plan.bits)]


def _forward(plan: _Plan, x, packed, scales, zeros):
  m, k = x.shape
  h = plan.chunk // plan.per
  xp = x.reshape(m, k // plan.per, plan.per)  # [:, j, r] = x[:, per·j + r]

  def step(i, acc):
    planes = _chunk_planes(plan, packed, scales, zeros, i, x.dtype)
    xs = jax.lax.dynamic_slice_in_dim(xp, i * h, h, 1)
    for r, w in enumerate(planes):
      acc = acc + dot_f32(xs[:, :, r], w)
    return acc

  acc = jax.lax.fori_loop(0, k // plan.chunk, step,
                          jnp.zeros((m, packed.shape[1]), jnp.float32))
  return acc.astype(x.dtype)


def _dx(plan: _Plan, dy, packed, scales, zeros):
  """dx = dy @ W̃ᵀ [M, K] in dy.dtype, one chunk of columns per step."""
  m = dy.shape[0]
  k = plan.per * packed.shape[0]
  h = plan.chunk // plan.per

  def step(i, dx):
    planes = _chunk_planes(plan, packed, scales, zeros, i, dy.dtype)
    part = jnp.stack([dot_f32(dy, w, trans_b=True) for w in planes], axis=-1)
    return jax.lax.dynamic_update_slice_in_dim(dx, part.astype(dx.dtype), i * h, 1)

  dx = jax.lax.fori_loop(0, k // plan.chunk, step, jnp.zeros((m, k // plan.per, plan.per),
                                                             dy.dtype))
  return dx.reshape(m, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _intq(plan: _Plan, x, packed, scales, zeros):
  return _forward(plan, x, packed, scales, zeros)


def _intq_fwd(plan, x, packed, scales, zeros):
  return _forward(plan, x, packed, scales, zeros), (packed, scales, zeros)


def _intq_bwd(plan, res, dy):
  packed, scales, zeros = res
  return _dx(plan, dy, packed, scales, zeros), None, None, None


_intq.defvjp(_intq_fwd, _intq_bwd)


def intq_matmul_xla(x: Array, packed: Array, scales: Array, zeros: Array, *, bits: int,
                    group_size: int, chunk: int | None = None) -> Array:
  """x [M, K] float @ W̃ (packed uint8 [K·container/8, N], scales and zeros float32
  [K/group_size, N]) → [M, N] in x.dtype, float32 accumulation; differentiable in x only.
  chunk: rows of W̃ per step (divides K, a multiple of the codes per byte, and a multiple or a
  divisor of group_size; default `chunk_rows`)."""
  k = x.shape[1]
  chunk = chunk_rows(k, group_size, bits) if chunk is None else chunk
  if not chunk_ok(chunk, k, group_size, bits):
    raise ValueError(f"intq_matmul_xla: chunk = {chunk!r} is not allowed: it must divide K = {k}, "
                     f"be a multiple of {codes_per_byte(bits)} (codes per byte at bits = {bits}) "
                     f"and a multiple or a divisor of group_size = {group_size}")
  return _intq(_Plan(bits=bits, group_size=group_size, chunk=chunk), x, packed, scales, zeros)
