"""NF4 matmul in plain JAX, chunked over K (any backend): the full-precision weight never exists.

x @ W̃ = Σ_c x[:, chunk c] @ W̃[chunk c]. A loop over chunks of a few quantization blocks
dequantizes one [chunk, N] slice of W̃ at a time (in x.dtype) and adds its product into a
float32 [M, N] accumulator, so the largest weight-sized temporary is [chunk, N]. The packed
bytes split into even rows (low nibbles) and odd rows (high nibbles): x is read as its even and
odd columns, x[:, 2i] @ W̃[2i] + x[:, 2i+1] @ W̃[2i+1], so no chunk is interleaved back.

custom_vjp: the residuals are the (already stored) codes and absmax, not x; dx = dy @ W̃ᵀ is
computed chunk by chunk the same way, each chunk writing its own columns of dx. codes and
absmax get no cotangent (None: zeros): the base is frozen.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from memx.kernels.nf4.reference import dot_f32, levels_of
from memx.typing import Array

TARGET_CHUNK = 512  # rows of W̃ dequantized per loop step (fewer when K or block_size decide)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  block_size: int
  chunk: int  # rows per step: a multiple of block_size that divides K


def chunk_rows(k: int, block_size: int, target: int = TARGET_CHUNK) -> int:
  """The largest multiple of block_size that divides K and is <= max(target, block_size)."""
  blocks = k // block_size
  per = max(1, target // block_size)
  return max(c for c in range(1, min(per, blocks) + 1) if blocks % c == 0) * block_size


def _chunk_weights(plan: _Plan, codes, absmax, i: int | Array, dtype):
  """Chunk i of W̃ as (even rows, odd rows), each [chunk/2, N] in dtype."""
  h, nb = plan.chunk // 2, plan.chunk // plan.block_size
  packed = jax.lax.dynamic_slice_in_dim(codes, i * h, h, 0)         # [h, N] uint8
  a = jax.lax.dynamic_slice_in_dim(absmax, i * nb, nb, 0)           # [nb, N]
  # Packed row j of the chunk holds rows 2j, 2j+1, both in block j // (block_size / 2).
  n = codes.shape[1]
  scale = jnp.broadcast_to(a[:, None, :], (nb, plan.block_size // 2, n)).reshape(h, n)
  even = (levels_of(packed & jnp.uint8(15)) * scale).astype(dtype)
  odd = (levels_of(packed >> jnp.uint8(4)) * scale).astype(dtype)
  return even, odd


def _forward(plan: _Plan, x, codes, absmax):
  m, k = x.shape
  h = plan.chunk // 2
  xp = x.reshape(m, k // 2, 2)  # [:, j, 0] = x[:, 2j], [:, j, 1] = x[:, 2j + 1]

  def step(i, acc):
    even, odd = _chunk_weights(plan, codes, absmax, i, x.dtype)
    xs = jax.lax.dynamic_slice_in_dim(xp, i * h, h, 1)
    return acc + dot_f32(xs[:, :, 0], even) + dot_f32(xs[:, :, 1], odd)

  acc = jax.lax.fori_loop(0, k // plan.chunk, step, jnp.zeros((m, codes.shape[1]), jnp.float32))
  return acc.astype(x.dtype)


def _dx(plan: _Plan, dy, codes, absmax, k: int):
  """dx = dy @ W̃ᵀ [M, K] in dy.dtype, one chunk of columns per step."""
  m = dy.shape[0]
  h = plan.chunk // 2

  def step(i, dx):
    even, odd = _chunk_weights(plan, codes, absmax, i, dy.dtype)
    part = jnp.stack([dot_f32(dy, even, trans_b=True), dot_f32(dy, odd, trans_b=True)], axis=-1)
    return jax.lax.dynamic_update_slice_in_dim(dx, part.astype(dx.dtype), i * h, 1)

  dx = jax.lax.fori_loop(0, k // plan.chunk, step, jnp.zeros((m, k // 2, 2), dy.dtype))
  return dx.reshape(m, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nf4(plan: _Plan, x, codes, absmax):
  return _forward(plan, x, codes, absmax)


def _nf4_fwd(plan, x, codes, absmax):
  return _forward(plan, x, codes, absmax), (codes, absmax)


def _nf4_bwd(plan, res, dy):
  codes, absmax = res
  return _dx(plan, dy, codes, absmax, 2 * codes.shape[0]), None, None


_nf4.defvjp(_nf4_fwd, _nf4_bwd)


def nf4_matmul_xla(x: Array, codes: Array, absmax: Array, *, block_size: int,
                   chunk: int | None = None) -> Array:
  """x [M, K] float @ W̃ (codes uint8 [K/2, N], absmax float32 [K/block_size, N]) → [M, N] in
  x.dtype, float32 accumulation; differentiable in x only. chunk: rows of W̃ per step (a
  multiple of block_size dividing K; default `chunk_rows`)."""
  k = x.shape[1]
  chunk = chunk_rows(k, block_size) if chunk is None else chunk
  if chunk % block_size or k % chunk:
    raise ValueError(f"nf4_matmul_xla: chunk = {chunk} must be a multiple of block_size = "
                     f"{block_size} that divides K = {k}")
  return _nf4(_Plan(block_size=block_size, chunk=chunk), x, codes, absmax)
