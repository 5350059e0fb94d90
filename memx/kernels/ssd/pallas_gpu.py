"""Pallas (Triton) GPU kernels for chunked SSD: the forward and backward passes.

The algorithm and notation are those of `xla.py` (Dao & Gu 2024, §6): chunks of Q tokens, cum
the chunk-local cumulative log-decay, x̃ = Δ x, boundary states H_c. The recurrence over chunk
boundaries runs one of two ways (`BlockSizes.state_pass`; "auto" picks by program count):
  * parallel, two kernels. Chunk states, grid (T/Q, B·H, P/bp): every chunk's own
    state S_c = (x̃ ∘ wst)ᵀ B [bp, N] (one tensor-core dot), fp32, all chunks at once. Scan,
    grid (B·H, P·N/block_scan): H_{c+1} = g_c H_c + S_c elementwise over a slice of the
    flattened state, `scan_rows` chunks per loop step (their row loads issue together),
    storing each entering H_c.
  * sequential, one kernel, grid (B, H, P/bp, N/bn): a program owns a [bp, bn] state tile in
    fp32 registers and walks the chunks in order, a load and a dot per chunk. No S_c buffer,
    but few programs with T/Q dependent steps each.
  * output forward, grid (T/Q, B·H, P/bp): fully parallel over chunks. C Bᵀ [Q, Q] (a dot over
    N), the decay mask L = exp(cum_t - cum_s) (s <= t, same segment) built from iotas, then
    y = (L ∘ C Bᵀ) x̃ + exp(cum_t) C H_cᵀ + D x: two more dots.
  * state backward: the same two ways in reverse for the state cotangents
    dH_{c-1} = exp(cum_last) dH_c + (dy ∘ exp(cum))ᵀ C, storing each chunk's outgoing dH_c.
  * chunk backward, grid (T/Q, B·H): per chunk and head, loops over P tiles accumulating
    dy x̃ᵀ [Q, Q], dy H_c [Q, N] and x̃ dH_c [Q, N] in fp32, writing dx and Δ's gradient per
    tile, then dB, dC (per head; groups summed outside) and d cum (equations in xla.py).
The decays are fp32 and taken inside one chunk only (cum_t - cum_s stays small); dots take
operands in the input dtype (bf16 on tensor cores) with fp32 accumulation, and fp32 operands
use full-precision (not TF32) dots so fp32 results match the reference. Boundary states and
their cotangents are stored in the matmul dtype (what their dots read), carried in fp32. Custom
VJP residuals: the inputs and the boundary states.

Runs compiled on NVIDIA GPUs (Triton lowering) and in the Pallas interpreter anywhere
(`interpret=True`, what CPU tests use).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memx.kernels import SSD_FINAL_STATE, SSD_OUT, SSD_STATES
from memx.kernels.ssd.config import BlockSizes
from memx.kernels.ssd.xla import Plan

F32 = jnp.float32
MAX_STATE = 256  # the output kernels hold [Q, N] tiles of B and C and a [bp, N] state tile


def _next_pow2(x: int) -> int:
  return max(16, 1 << (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _PPlan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  chunk: int
  n_chunks: int
  segments: bool
  p_pad: int
  n_pad: int
  block_p: int
  block_n: int
  block_p_bwd: int
  block_scan: int
  scan_rows: int
  state_pass: str
  blocks: BlockSizes
  interpret: bool

  @property
  def t_pad(self) -> int:
    return self.chunk * self.n_chunks

  def params(self, backward: bool = False, score_tile: bool = False):
    """Launch settings; score_tile: the forward output kernel, which holds a Q x Q tile."""
    b = self.blocks
    if backward:
      return plgpu.CompilerParams(num_warps=b.num_warps_bwd, num_stages=b.num_stages_bwd)
    warps = b.forward_warps(self.chunk) if score_tile else (b.num_warps or 4)
    return plgpu.CompilerParams(num_warps=warps, num_stages=b.num_stages)


def unsupported_reason(p: int, n: int) -> str | None:
  del p
  if n > MAX_STATE:
    return f"state size N = {n} > {MAX_STATE} does not fit the output kernel's register tiles"
  return None


# "auto" walks the chunks sequentially when that walk alone has this many programs (one per
# H100 SM, about). Measured on an H100 (session 8, fwd, device time): B1 H16 P128 N128 T16k,
# 128 programs: sequential 0.50 ms vs parallel 0.57 (the parallel pass writes and reads fp32
# chunk states as big as x); the 64k student, B1 H16 P64 N64, 32 programs: sequential 1.71 ms
# wall vs parallel 1.11 (fwd+bwd 5.39 vs 3.39).
SEQUENTIAL_MIN_PROGRAMS = 128


def make_plan(plan: Plan, p: int, n: int, blocks: BlockSizes, interpret: bool,
              batch_heads: int = 1) -> _PPlan:
  """Pads P and N to Triton-friendly sizes and fixes the tiles and the state pass (no
  tracing); batch_heads = B·H decides `state_pass="auto"`."""
  n_pad = _next_pow2(n)
  block_p = min(blocks.block_p, _next_pow2(p))
  p_pad = -(-p // block_p) * block_p
  block_n = min(blocks.block_n, n_pad)
  state_pass = blocks.state_pass
  if state_pass == "auto":
    walkers = batch_heads * (p_pad // block_p) * (n_pad // block_n)
    state_pass = "sequential" if walkers >= SEQUENTIAL_MIN_PROGRAMS else "parallel"
  # block_scan divides the flattened state; scan_rows is at most the chunk count.
  return _PPlan(chunk=plan.chunk, n_chunks=plan.n_chunks, segments=plan.segments,
                p_pad=p_pad, n_pad=n_pad, block_p=block_p, block_n=block_n,
                block_p_bwd=min(blocks.block_p_bwd or block_p, block_p),
                block_scan=math.gcd(blocks.block_scan, p_pad * n_pad),
                scan_rows=min(blocks.scan_rows, 1 << (plan.n_chunks.bit_length() - 1)),
                state_pass=state_pass, blocks=blocks, interpret=interpret)


def _dot(a, b, *, trans_a=False, trans_b=False):
  """fp32-accumulated dot; fp32 operands in full precision, not TF32."""
  precision = lax.Precision.HIGHEST if a.dtype == F32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _chunk_factors(plan: _PPlan, cum, seg, seg_prev, last=None, seg_last=None):
  """eoff [Q] (chunk start -> t), wst [Q] (s -> chunk end), g (whole chunk), and the segment
  mask pieces, from the chunk's cum [Q] and (optionally) its segment ids [Q]. `last` and
  `seg_last` (the chunk's final cum and id) may come loaded as scalars; else a masked sum over
  the chunk extracts them (a reduction across the program's warps)."""
  q = plan.chunk
  idx = jnp.arange(q)
  if last is None:
    last = jnp.sum(jnp.where(idx == q - 1, cum, 0.0))   # cum[Q-1] as a scalar
  eoff = jnp.exp(cum)
  wst = jnp.exp(last - cum)
  g = jnp.exp(last)
  if plan.segments:
    if seg_last is None:
      seg_last = jnp.sum(jnp.where(idx == q - 1, seg, 0))
    eoff = jnp.where(seg == seg_prev, eoff, 0.0)
    wst = jnp.where(seg == seg_last, wst, 0.0)
    g = jnp.where(seg_last == seg_prev, g, 0.0)
  return eoff, wst, g


def _decay_matrix(plan: _PPlan, cum, seg):
  """L [Q, Q]: exp(cum_t - cum_s) for s <= t in the same segment, else 0."""
  q = plan.chunk
  rows = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  vis = rows >= cols
  if plan.segments:
    vis = vis & (seg[:, None] == seg[None, :])
  # Masked before exp: above the diagonal cum_t - cum_s > 0 could overflow.
  return jnp.exp(jnp.where(vis, cum[:, None] - cum[None, :], -jnp.inf))


# --- forward -----------------------------------------------------------------------------------


def _chunk_lasts(plan: _PPlan, cum_ref, seg_ref):
  """(cum, segment id) of the last token of a one-chunk block, by one-element loads: no
  reduction across the program's warps (ptxas: one shuffle tree and barriers fewer)."""
  q = plan.chunk
  return (_last_of_chunk(cum_ref, 0, q),
          _last_of_chunk(seg_ref, 0, q) if plan.segments else None)


def _last_of_chunk(ref, c, q: int):
  """ref[c·q + q - 1] as a scalar, by a one-element load: the sequential walks need it on their
  serial path, where a masked sum over the chunk would add a cross-warp reduction per step."""
  return jnp.sum(ref[pl.ds(c * q + q - 1, 1)])


def _state_fwd_kernel(*refs, plan: _PPlan):
  if plan.segments:
    x_ref, dt_ref, cum_ref, b_ref, h0_ref, seg_ref, sp_ref, h_in_ref, h_last_ref = refs
  else:
    x_ref, dt_ref, cum_ref, b_ref, h0_ref, h_in_ref, h_last_ref = refs
  q = plan.chunk

  def body(c, state):
    rows = pl.ds(pl.multiple_of(c * q, q), q)
    cum = cum_ref[rows]
    seg, seg_prev = (seg_ref[rows], sp_ref[c]) if plan.segments else (None, None)
    seg_last = _last_of_chunk(seg_ref, c, q) if plan.segments else None
    _, wst, g = _chunk_factors(plan, cum, seg, seg_prev, _last_of_chunk(cum_ref, c, q), seg_last)
    x = x_ref[rows, :]
    bm = b_ref[rows, :]
    # S_c = xᵀ diag(Δ ∘ w) B: the per-token factor scales whichever operand tile is narrower
    # (fewer fp32 round trips on the serial path); the other goes to the dot as loaded.
    w = (dt_ref[rows].astype(F32) * wst)[:, None]
    if plan.block_n < plan.block_p:
      bm = (bm.astype(F32) * w).astype(bm.dtype)
    else:
      x = (x.astype(F32) * w).astype(x.dtype)
    h_in_ref[c] = state.astype(h_in_ref.dtype)
    return g * state + _dot(x, bm, trans_a=True)                 # [bp, Q] x [Q, bn]

  h_last_ref[...] = lax.fori_loop(0, plan.n_chunks, body, h0_ref[...].astype(F32))


def _chunk_state_fwd_kernel(*refs, plan: _PPlan):
  """One chunk's own state S_c = (x̃ ∘ wst)ᵀ B for one P tile: [bp, N] in fp32."""
  if plan.segments:
    x_ref, dt_ref, cum_ref, b_ref, seg_ref, sp_ref, s_ref = refs
  else:
    x_ref, dt_ref, cum_ref, b_ref, s_ref = refs
  ci = pl.program_id(0)
  seg, seg_prev = (seg_ref[...], sp_ref[ci]) if plan.segments else (None, None)
  _, wst, _ = _chunk_factors(plan, cum_ref[...], seg, seg_prev,
                             *_chunk_lasts(plan, cum_ref, seg_ref if plan.segments else None))
  x = x_ref[...]
  xw = (x.astype(F32) * (dt_ref[...].astype(F32) * wst)[:, None]).astype(x.dtype)
  s_ref[...] = _dot(xw, b_ref[...], trans_a=True).astype(s_ref.dtype)


def _chunk_state_bwd_kernel(*refs, plan: _PPlan):
  """What one chunk's outputs send to its entering state, (dy ∘ eoff)ᵀ C: [bp, N] in fp32."""
  if plan.segments:
    dy_ref, cum_ref, c_ref, seg_ref, sp_ref, s_ref = refs
  else:
    dy_ref, cum_ref, c_ref, s_ref = refs
  ci = pl.program_id(0)
  seg, seg_prev = (seg_ref[...], sp_ref[ci]) if plan.segments else (None, None)
  eoff, _, _ = _chunk_factors(plan, cum_ref[...], seg, seg_prev)
  dy = dy_ref[...]
  dye = (dy.astype(F32) * eoff[:, None]).astype(dy.dtype)
  s_ref[...] = _dot(dye, c_ref[...], trans_a=True).astype(s_ref.dtype)


def _scan_kernel(s_ref, g_ref, h0_ref, h_ref, h_last_ref, *, plan: _PPlan, reverse: bool):
  """The boundary recurrence on a [block_scan] slice of the flattened state: in walk order,
  h_ref[c] = the state entering chunk c, then state <- g_c state + S_c.

  Each fori step walks `scan_rows` chunks unrolled, one row each: the rows' loads do not
  depend on the state, so they issue ahead of the multiply-adds and the walk waits on memory
  T/(Q·u) times, not T/Q. (Loading the u rows as one [u, block_scan] tile instead made every
  step pick its row out with a masked sum across threads: ~54 SASS instructions per element
  and chunk, with 10 shuffles and 16 shared-memory accesses, against ~3 here.) The T/Q mod u
  chunks past the last whole group (the first ones walked, in reverse) go one by one.
  """
  u, nc = plan.scan_rows, plan.n_chunks
  groups, tail = nc // u, nc % u

  def walk(c0, size: int, state):
    """The `size` chunks from c0 (static size), in walk order; returns the state after them."""
    for i in (range(size - 1, -1, -1) if reverse else range(size)):
      c = c0 + i
      h_ref[c, :] = state.astype(h_ref.dtype)
      state = g_ref[c] * state + s_ref[c, :].astype(F32)
    return state

  def whole(j, state):
    return walk(pl.multiple_of((groups - 1 - j if reverse else j) * u, u), u, state)

  def single(j, state):
    return walk(nc - 1 - j if reverse else groups * u + j, 1, state)

  state = h0_ref[...].astype(F32)
  if reverse:
    state = lax.fori_loop(0, tail, single, state)
  state = lax.fori_loop(0, groups, whole, state)
  if not reverse:
    state = lax.fori_loop(0, tail, single, state)
  h_last_ref[...] = state


def _out_fwd_kernel(*refs, plan: _PPlan, heads: int):
  if plan.segments:
    x_ref, dt_ref, cum_ref, b_ref, c_ref, h_in_ref, d_ref, seg_ref, sp_ref, y_ref = refs
  else:
    x_ref, dt_ref, cum_ref, b_ref, c_ref, h_in_ref, d_ref, y_ref = refs
  ci, bh = pl.program_id(0), pl.program_id(1)
  h = bh % heads
  cum = cum_ref[...]
  seg, seg_prev = (seg_ref[...], sp_ref[ci]) if plan.segments else (None, None)
  eoff, _, _ = _chunk_factors(plan, cum, seg, seg_prev)
  x = x_ref[...]
  xdt = (x.astype(F32) * dt_ref[...].astype(F32)[:, None]).astype(x.dtype)
  cm = c_ref[...]
  # Intra-chunk: (L ∘ C Bᵀ) x̃, with the Q x Q scores in fp32 until the second dot.
  scores = _dot(cm, b_ref[...], trans_b=True) * _decay_matrix(plan, cum, seg)
  y = _dot(scores.astype(x.dtype), xdt)
  # The entering state read out by C: [Q, N] x [N, bp].
  y_off = _dot(cm, h_in_ref[...].astype(x.dtype), trans_b=True)
  y = y + eoff[:, None] * y_off + d_ref[h] * x.astype(F32)
  y_ref[...] = y.astype(y_ref.dtype)


# --- backward ----------------------------------------------------------------------------------


def _state_bwd_kernel(*refs, plan: _PPlan):
  if plan.segments:
    dy_ref, cum_ref, c_ref, dh_last_ref, seg_ref, sp_ref, dh_out_ref, dh0_ref = refs
  else:
    dy_ref, cum_ref, c_ref, dh_last_ref, dh_out_ref, dh0_ref = refs
  q, n = plan.chunk, plan.n_chunks

  def body(j, dstate):
    c = n - 1 - j
    rows = pl.ds(pl.multiple_of(c * q, q), q)
    cum = cum_ref[rows]
    seg, seg_prev = (seg_ref[rows], sp_ref[c]) if plan.segments else (None, None)
    seg_last = _last_of_chunk(seg_ref, c, q) if plan.segments else None
    eoff, _, g = _chunk_factors(plan, cum, seg, seg_prev, _last_of_chunk(cum_ref, c, q),
                                seg_last)
    dh_out_ref[c] = dstate.astype(dh_out_ref.dtype)
    dy = dy_ref[rows, :]
    dye = (dy.astype(F32) * eoff[:, None]).astype(dy.dtype)
    # What chunk c's outputs send back to its entering state: (dy ∘ eoff)ᵀ C.
    return g * dstate + _dot(dye, c_ref[rows, :], trans_a=True)

  dh0_ref[...] = lax.fori_loop(0, n, body, dh_last_ref[...].astype(F32))


def _chunk_bwd_kernel(*refs, plan: _PPlan, heads: int):
  if plan.segments:
    (x_ref, dy_ref, dt_ref, cum_ref, b_ref, c_ref, h_in_ref, dh_out_ref, d_ref, seg_ref, sp_ref,
     dx_ref, ddt_ref, dcum_ref, db_ref, dc_ref, dd_ref) = refs
  else:
    (x_ref, dy_ref, dt_ref, cum_ref, b_ref, c_ref, h_in_ref, dh_out_ref, d_ref,
     dx_ref, ddt_ref, dcum_ref, db_ref, dc_ref, dd_ref) = refs
  q, bp, nn = plan.chunk, plan.block_p_bwd, plan.n_pad
  ci, bh = pl.program_id(0), pl.program_id(1)
  h = bh % heads
  cum = cum_ref[...]
  dt = dt_ref[...].astype(F32)
  seg, seg_prev = (seg_ref[...], sp_ref[ci]) if plan.segments else (None, None)
  eoff, wst, g = _chunk_factors(plan, cum, seg, seg_prev,
                                *_chunk_lasts(plan, cum_ref, seg_ref if plan.segments else None))
  bm, cm = b_ref[...], c_ref[...]
  mm = bm.dtype
  lmat = _decay_matrix(plan, cum, seg)
  cb = _dot(cm, bm, trans_b=True)
  amat = (lmat * cb).astype(mm)                        # L ∘ C Bᵀ, the forward's scores
  dd = d_ref[h]

  def p_tile(j, carry):
    dxdot, dc_off, db_st, gsum, ddt, ddd = carry
    cols = pl.ds(pl.multiple_of(j * bp, bp), bp)
    x = x_ref[:, cols].astype(F32)
    dy = dy_ref[:, cols]
    dy32 = dy.astype(F32)
    xdt = (x * dt[:, None]).astype(mm)
    h_in = h_in_ref[cols, :].astype(F32)               # [bp, N]
    dh = dh_out_ref[cols, :].astype(F32)
    # dx̃_s = Σ_t A_ts dy_t + wst_s dH B_s
    dxdt = _dot(amat, dy.astype(mm), trans_a=True)
    dxdt = dxdt + wst[:, None] * _dot(bm, dh.astype(mm), trans_b=True)
    dx_ref[:, cols] = (dxdt * dt[:, None] + dd * dy32).astype(dx_ref.dtype)
    ddt = ddt + jnp.sum(dxdt * x, axis=1)
    ddd = ddd + jnp.sum(dy32 * x, axis=1)
    dxdot = dxdot + _dot(dy.astype(mm), xdt, trans_b=True)          # dy_t · x̃_s
    dc_off = dc_off + _dot(dy.astype(mm), h_in.astype(mm))           # dy_t H
    db_st = db_st + _dot(xdt, dh.astype(mm))                         # x̃_s dH
    # One axis at a time: Pallas-Triton lowers multi-axis reductions through a path that
    # loses the avals' sharding under an abstract mesh.
    gsum = gsum + jnp.sum(jnp.sum(dh * h_in, axis=1))
    return dxdot, dc_off, db_st, gsum, ddt, ddd

  zq = jnp.zeros((q,), F32)
  init = (jnp.zeros((q, q), F32), jnp.zeros((q, nn), F32), jnp.zeros((q, nn), F32),
          jnp.zeros((), F32), zq, zq)
  dxdot, dc_off, db_st, gsum, ddt, ddd = lax.fori_loop(0, plan.p_pad // bp, p_tile, init)
  dc_off = eoff[:, None] * dc_off
  db_st = wst[:, None] * db_st
  ldx = (lmat * dxdot).astype(mm)
  dc_ref[...] = _dot(ldx, bm) + dc_off
  db_ref[...] = _dot(ldx, cm, trans_a=True) + db_st
  z = cb * lmat * dxdot
  state_term = jnp.sum(db_st * bm.astype(F32), axis=1)
  dcum = (jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + jnp.sum(dc_off * cm.astype(F32), axis=1)
          - state_term)
  last = jnp.sum(state_term) + g * gsum
  dcum_ref[...] = dcum + jnp.where(jnp.arange(q) == q - 1, last, 0.0)
  ddt_ref[...] = ddt
  dd_ref[...] = ddd


# --- launches ----------------------------------------------------------------------------------


def _seg_args(plan: _PPlan, seg, specs):
  """(arrays, specs) for segment ids and each chunk's preceding id, or empty when unused."""
  if not plan.segments:
    return [], []
  q = plan.chunk
  seg_prev = jnp.concatenate([seg[:, :1], seg[:, q - 1::q][:, :-1]], axis=1)   # [B, nc]
  return [seg, seg_prev], specs


def _state_fwd_sequential(plan: _PPlan, x, dt_t, cum_t, bm, h0, seg):
  bsz, tp, h, _ = x.shape
  gb = bm.shape[2]
  bp, bn, nc = plan.block_p, plan.block_n, plan.n_chunks
  grid = (bsz, h, plan.p_pad // bp, plan.n_pad // bn)
  specs = [pl.BlockSpec((None, tp, None, bp), lambda b, i, p, n: (b, 0, i, p)),
           pl.BlockSpec((None, None, tp), lambda b, i, p, n: (b, i, 0)),
           pl.BlockSpec((None, None, tp), lambda b, i, p, n: (b, i, 0)),
           pl.BlockSpec((None, tp, None, bn), lambda b, i, p, n: (b, 0, i // (h // gb), n)),
           pl.BlockSpec((None, None, bp, bn), lambda b, i, p, n: (b, i, p, n))]
  seg_arrays, seg_specs = _seg_args(plan, seg, [
      pl.BlockSpec((None, tp), lambda b, i, p, n: (b, 0)),
      pl.BlockSpec((None, nc), lambda b, i, p, n: (b, 0))])
  out_specs = [pl.BlockSpec((None, nc, None, bp, bn), lambda b, i, p, n: (b, 0, i, p, n)),
               pl.BlockSpec((None, None, bp, bn), lambda b, i, p, n: (b, i, p, n))]
  # Boundary states are stored in the matmul dtype: every consumer feeds them to a dot in that
  # dtype anyway, and bf16 halves the dominant memory traffic (T/Q·P·N per head, written here
  # and read by the output kernel). The carried state and the final state stay fp32.
  out_shape = [jax.ShapeDtypeStruct((bsz, nc, h, plan.p_pad, plan.n_pad), x.dtype),
               jax.ShapeDtypeStruct(h0.shape, F32)]
  return pl.pallas_call(
      functools.partial(_state_fwd_kernel, plan=plan), grid=grid,
      in_specs=specs + seg_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plan.params(), interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * bsz * tp * h * plan.p_pad * plan.n_pad, transcendentals=bsz * tp * h,
          bytes_accessed=x.size * x.dtype.itemsize + 4 * bsz * nc * h * plan.p_pad * plan.n_pad),
      name="memx_ssd_state_fwd",
  )(x, dt_t, cum_t, bm, h0, *seg_arrays)


def _chunk_specs(plan: _PPlan, h: int, gb: int, gc: int, p_block: int, grid_p: bool):
  """BlockSpecs over the grid (chunk, batch·head[, P tile]) for the per-chunk kernels."""
  q = plan.chunk
  if grid_p:
    def idx(f):
      return lambda c, bh, p: f(c, bh // h, bh % h, p)
  else:
    def idx(f):
      return lambda c, bh: f(c, bh // h, bh % h, 0)
  return {
      "x": pl.BlockSpec((None, q, None, p_block), idx(lambda c, b, i, p: (b, c, i, p))),
      "row": pl.BlockSpec((None, None, q), idx(lambda c, b, i, p: (b, i, c))),
      "b": pl.BlockSpec((None, q, None, plan.n_pad),
                        idx(lambda c, b, i, p: (b, c, i // (h // gb), 0))),
      "c": pl.BlockSpec((None, q, None, plan.n_pad),
                        idx(lambda c, b, i, p: (b, c, i // (h // gc), 0))),
      "state": pl.BlockSpec((None, None, None, p_block, plan.n_pad),
                            idx(lambda c, b, i, p: (b, c, i, p, 0))),
      "whole_h": pl.BlockSpec((h,), idx(lambda c, b, i, p: (0,))),
      "seg": pl.BlockSpec((None, q), idx(lambda c, b, i, p: (b, c))),
      "seg_prev": pl.BlockSpec((None, plan.n_chunks), idx(lambda c, b, i, p: (b, 0))),
      "per_head_n": pl.BlockSpec((None, q, None, plan.n_pad), idx(lambda c, b, i, p: (b, c, i, 0))),
  }


def _chunk_decay(plan: _PPlan, cum_t, seg):
  """g [B, H, T/Q]: each chunk's decay from its start to its end (exp of its last cum), zero
  where a segment starts inside the chunk or at its first token (as `_chunk_factors`)."""
  q = plan.chunk
  g = jnp.exp(cum_t[..., q - 1::q].astype(F32))
  if plan.segments:
    seg_last = seg[:, q - 1::q]
    seg_prev = jnp.concatenate([seg[:, :1], seg_last[:, :-1]], axis=1)
    g = jnp.where((seg_last == seg_prev)[:, None, :], g, 0.0)
  return g


def _chunk_states(plan: _PPlan, v, cum_t, bc, seg, dt_t=None):
  """Every chunk's own state, in parallel over chunks: [B, T/Q, H, P, N], fp32 (or v.dtype
  without `chunk_states_fp32`). Forward (with dt_t): v = x, bc = B; backward: v = dy, bc = C."""
  bsz, tp, h, _ = v.shape
  s = _chunk_specs(plan, h, bc.shape[2], bc.shape[2], plan.block_p, grid_p=True)
  seg_arrays, seg_specs = _seg_args(plan, seg, [s["seg"], s["seg_prev"]])
  forward = dt_t is not None
  args = [v, dt_t, cum_t, bc] if forward else [v, cum_t, bc]
  specs = [s["x"], s["row"], s["row"], s["b"]] if forward else [s["x"], s["row"], s["c"]]
  kernel = _chunk_state_fwd_kernel if forward else _chunk_state_bwd_kernel
  size = bsz * plan.n_chunks * h * plan.p_pad * plan.n_pad
  s_bytes = 4 if plan.blocks.chunk_states_fp32 else v.dtype.itemsize
  return pl.pallas_call(
      functools.partial(kernel, plan=plan),
      grid=(plan.n_chunks, bsz * h, plan.p_pad // plan.block_p),
      in_specs=specs + seg_specs, out_specs=s["state"],
      out_shape=jax.ShapeDtypeStruct((bsz, plan.n_chunks, h, plan.p_pad, plan.n_pad),
                                     F32 if plan.blocks.chunk_states_fp32 else v.dtype),
      compiler_params=plan.params(backward=not forward), interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * bsz * tp * h * plan.p_pad * plan.n_pad, transcendentals=bsz * tp * h,
          bytes_accessed=v.size * v.dtype.itemsize + s_bytes * size),
      name="memx_ssd_chunk_states" + ("" if forward else "_bwd"),
  )(*args, *seg_arrays)


def _scan(plan: _PPlan, s, g, h0, dtype, *, reverse: bool):
  """The recurrence over chunk boundaries from the chunk states s [B, nc, H, P, N], decays g
  [B, H, nc] and initial state h0 [B, H, P, N]: (the state entering each chunk in `dtype`,
  the final state in fp32). Reverse walks from the last chunk (the backward pass)."""
  bsz, nc, h = s.shape[:3]
  e, blk = plan.p_pad * plan.n_pad, plan.block_scan
  head = lambda bh, j: (bh // h, bh % h, j)  # noqa: E731
  h_in, h_last = pl.pallas_call(
      functools.partial(_scan_kernel, plan=plan, reverse=reverse),
      grid=(bsz * h, e // blk),
      in_specs=[pl.BlockSpec((None, nc, None, blk), lambda bh, j: (bh // h, 0, bh % h, j)),
                pl.BlockSpec((None, None, nc), lambda bh, j: (bh // h, bh % h, 0)),
                pl.BlockSpec((None, None, blk), head)],
      out_specs=[pl.BlockSpec((None, nc, None, blk), lambda bh, j: (bh // h, 0, bh % h, j)),
                 pl.BlockSpec((None, None, blk), head)],
      out_shape=[jax.ShapeDtypeStruct((bsz, nc, h, e), dtype),
                 jax.ShapeDtypeStruct((bsz, h, e), F32)],
      compiler_params=plan.params(backward=reverse), interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * s.size, transcendentals=0,
          bytes_accessed=s.size * (s.dtype.itemsize + jnp.dtype(dtype).itemsize)
          + 8 * h0.size),
      name="memx_ssd_state_scan" + ("_bwd" if reverse else ""),
  )(s.reshape(bsz, nc, h, e), g, h0.reshape(bsz, h, e))
  return h_in.reshape(s.shape), h_last.reshape(h0.shape)


def _state_fwd(plan: _PPlan, x, dt_t, cum_t, bm, h0, seg):
  """(boundary states entering each chunk [B, nc, H, P, N] in x.dtype, final state fp32)."""
  if plan.state_pass == "sequential":
    return _state_fwd_sequential(plan, x, dt_t, cum_t, bm, h0, seg)
  s = _chunk_states(plan, x, cum_t, bm, seg, dt_t=dt_t)
  return _scan(plan, s, _chunk_decay(plan, cum_t, seg), h0, x.dtype, reverse=False)


def _state_bwd(plan: _PPlan, dy, cum_t, cm, dh_last, seg):
  """(state cotangents leaving each chunk [B, nc, H, P, N] in dy.dtype, dh0 fp32)."""
  if plan.state_pass == "sequential":
    return _state_bwd_sequential(plan, dy, cum_t, cm, dh_last, seg)
  s = _chunk_states(plan, dy, cum_t, cm, seg)
  return _scan(plan, s, _chunk_decay(plan, cum_t, seg), dh_last, dy.dtype, reverse=True)


def _out_fwd(plan: _PPlan, x, dt_t, cum_t, bm, cm, h_in, d, seg):
  bsz, tp, h, _ = x.shape
  s = _chunk_specs(plan, h, bm.shape[2], cm.shape[2], plan.block_p, grid_p=True)
  seg_arrays, seg_specs = _seg_args(plan, seg, [s["seg"], s["seg_prev"]])
  n_flops = 2 * bsz * tp * h * (plan.chunk * (plan.n_pad + plan.p_pad) + plan.p_pad * plan.n_pad)
  return pl.pallas_call(
      functools.partial(_out_fwd_kernel, plan=plan, heads=h),
      grid=(plan.n_chunks, bsz * h, plan.p_pad // plan.block_p),
      in_specs=[s["x"], s["row"], s["row"], s["b"], s["c"], s["state"], s["whole_h"],
                *seg_specs],
      out_specs=s["x"], out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      compiler_params=plan.params(score_tile=True), interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(flops=n_flops, transcendentals=bsz * tp * h * plan.chunk,
                                    bytes_accessed=2 * x.size * x.dtype.itemsize
                                    + h_in.size * 4),
      name="memx_ssd_out_fwd",
  )(x, dt_t, cum_t, bm, cm, h_in, d, *seg_arrays)


def _state_bwd_sequential(plan: _PPlan, dy, cum_t, cm, dh_last, seg):
  bsz, tp, h, _ = dy.shape
  gc = cm.shape[2]
  bp, bn, nc = plan.block_p, plan.block_n, plan.n_chunks
  grid = (bsz, h, plan.p_pad // bp, plan.n_pad // bn)
  specs = [pl.BlockSpec((None, tp, None, bp), lambda b, i, p, n: (b, 0, i, p)),
           pl.BlockSpec((None, None, tp), lambda b, i, p, n: (b, i, 0)),
           pl.BlockSpec((None, tp, None, bn), lambda b, i, p, n: (b, 0, i // (h // gc), n)),
           pl.BlockSpec((None, None, bp, bn), lambda b, i, p, n: (b, i, p, n))]
  seg_arrays, seg_specs = _seg_args(plan, seg, [
      pl.BlockSpec((None, tp), lambda b, i, p, n: (b, 0)),
      pl.BlockSpec((None, nc), lambda b, i, p, n: (b, 0))])
  out_specs = [pl.BlockSpec((None, nc, None, bp, bn), lambda b, i, p, n: (b, 0, i, p, n)),
               pl.BlockSpec((None, None, bp, bn), lambda b, i, p, n: (b, i, p, n))]
  out_shape = [jax.ShapeDtypeStruct((bsz, nc, h, plan.p_pad, plan.n_pad), dy.dtype),
               jax.ShapeDtypeStruct(dh_last.shape, F32)]
  return pl.pallas_call(
      functools.partial(_state_bwd_kernel, plan=plan), grid=grid,
      in_specs=specs + seg_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plan.params(backward=True), interpret=plan.interpret,
      name="memx_ssd_state_bwd",
  )(dy, cum_t, cm, dh_last, *seg_arrays)


def _chunk_bwd(plan: _PPlan, x, dy, dt_t, cum_t, bm, cm, h_in, dh_out, d, seg):
  bsz, tp, h, _ = x.shape
  s = _chunk_specs(plan, h, bm.shape[2], cm.shape[2], plan.p_pad, grid_p=False)
  seg_arrays, seg_specs = _seg_args(plan, seg, [s["seg"], s["seg_prev"]])
  row_shape = jax.ShapeDtypeStruct((bsz, h, tp), F32)
  per_head = jax.ShapeDtypeStruct((bsz, tp, h, plan.n_pad), F32)
  return pl.pallas_call(
      functools.partial(_chunk_bwd_kernel, plan=plan, heads=h),
      grid=(plan.n_chunks, bsz * h),
      in_specs=[s["x"], s["x"], s["row"], s["row"], s["b"], s["c"], s["state"], s["state"],
                s["whole_h"], *seg_specs],
      out_specs=[s["x"], s["row"], s["row"], s["per_head_n"], s["per_head_n"], s["row"]],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), row_shape, row_shape, per_head,
                 per_head, row_shape],
      compiler_params=plan.params(backward=True), interpret=plan.interpret,
      name="memx_ssd_chunk_bwd",
  )(x, dy, dt_t, cum_t, bm, cm, h_in, dh_out, d, *seg_arrays)


# --- custom VJP and entry point ----------------------------------------------------------------


def _heads_major(v):
  """[B, Tp, H] -> [B, H, Tp]: per-head rows load as contiguous vectors."""
  return jnp.swapaxes(v, 1, 2)


def _forward(plan: _PPlan, x, dt, cum, bm, cm, d, h0, seg):
  dt_t, cum_t = _heads_major(dt), _heads_major(cum)
  h_in, h_last = _state_fwd(plan, x, dt_t, cum_t, bm, h0, seg)
  y = _out_fwd(plan, x, dt_t, cum_t, bm, cm, h_in, d, seg)
  return y, h_in, h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd(plan: _PPlan, x, dt, cum, bm, cm, d, h0, seg):
  y, _, h_last = _forward(plan, x, dt, cum, bm, cm, d, h0, seg)
  return y, h_last


def _ssd_fwd(plan, x, dt, cum, bm, cm, d, h0, seg):
  y, h_in, h_last = _forward(plan, x, dt, cum, bm, cm, d, h0, seg)
  y, h_in = checkpoint_name(y, SSD_OUT), checkpoint_name(h_in, SSD_STATES)
  h_last = checkpoint_name(h_last, SSD_FINAL_STATE)
  return (y, h_last), (x, dt, cum, bm, cm, d, h0, seg, h_in)


def _ssd_bwd(plan, res, cts):
  x, dt, cum, bm, cm, d, h0, seg, h_in = res
  dy, dh_last = cts
  dy = dy.astype(x.dtype)
  dt_t, cum_t = _heads_major(dt), _heads_major(cum)
  dh_out, dh0 = _state_bwd(plan, dy, cum_t, cm, dh_last.astype(F32), seg)
  dx, ddt, dcum, db_h, dc_h, ddd = _chunk_bwd(plan, x, dy, dt_t, cum_t, bm, cm, h_in, dh_out, d,
                                               seg)
  bsz, tp, h, _ = x.shape
  # Heads of a group share B (and C): their per-head gradients add up.
  db = db_h.reshape(bsz, tp, bm.shape[2], -1, plan.n_pad).sum(3)
  dc = dc_h.reshape(bsz, tp, cm.shape[2], -1, plan.n_pad).sum(3)
  return (dx, _heads_major(ddt).astype(dt.dtype), _heads_major(dcum), db.astype(bm.dtype),
          dc.astype(cm.dtype), ddd.sum(axis=(0, 2)).astype(d.dtype), dh0, None)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas(plan: _PPlan, x, dt, cum, bm, cm, d, h0, seg):
  """Same contract as `xla.ssd_chunked`; pads P and N to the Triton tiles around the kernels."""
  p, n = x.shape[-1], bm.shape[-1]
  pp, pn = plan.p_pad - p, plan.n_pad - n
  pad = lambda v, w: jnp.pad(v, ((0, 0),) * (v.ndim - 1) + ((0, w),))  # noqa: E731
  h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, pp), (0, pn)))
  y, h_last = _ssd(plan, pad(x, pp), dt, cum, pad(bm, pn), pad(cm, pn), d.astype(F32), h0, seg)
  return y[..., :p], h_last[:, :, :p, :n]
