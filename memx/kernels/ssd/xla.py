"""Chunked SSD in plain JAX (Dao & Gu 2024, §6 "the SSD algorithm"), with a memory-light VJP.

T is split into chunks of Q tokens (padded to a multiple of Q); per chunk and head, with cum
the chunk-local cumulative log-decay:
  1. intra-chunk (diagonal blocks): y_diag = (L ∘ C Bᵀ) x̃, L_ts = exp(cum_t - cum_s), s <= t,
     a masked Q x Q "attention" matmul;
  2. chunk states: S_c = Σ_s exp(cum_last - cum_s) x̃_s ⊗ B_s  ([P, N] per chunk);
  3. inter-chunk recurrence: H_{c+1} = exp(cum_last) H_c + S_c over the T/Q chunk boundaries
     (`lax.scan`), H_0 = the initial state;
  4. state to output: y_off_t = exp(cum_t) H_c C_t.
where x̃ = Δ x. Differences cum_t - cum_s are taken inside one chunk only, where both stay small,
so the unstable global-prefix-sum form never appears. Packed segments mask L, the decays into
and out of a chunk, and the carry between chunks.

The custom VJP saves only the inputs and the chunk-boundary states H_c ([B, T/Q, H, P, N]),
never the per-token [B, T, H, P, N] states autodiff through a token scan would keep. The
backward runs the recurrence for the state cotangents in reverse over chunks
(dH_{c-1} = exp(cum_last) dH_c + Σ_t exp(cum_t) dy_t ⊗ C_t), then each chunk's gradients are
local (equations in `_backward`). Matmul operands are cast to the input dtype (bf16 inputs feed
bf16 matmuls with fp32 accumulation, as the Pallas kernels do); decays, states and
accumulators are fp32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from memx.kernels import SSD_FINAL_STATE, SSD_OUT, SSD_STATES

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  chunk: int
  n_chunks: int
  segments: bool


def to_chunks(v, q: int):
  """[B, Tp, ...] -> [B, Tp/q, q, ...]."""
  return v.reshape(v.shape[0], v.shape[1] // q, q, *v.shape[2:])


def _by_group(v, groups: int, axis: int):
  """Splits the head axis into (groups, heads per group)."""
  return v.reshape(*v.shape[:axis], groups, v.shape[axis] // groups, *v.shape[axis + 1:])


def _expand(m, groups: int):
  """Repeats a [..., G, N] group axis (axis -2) to `groups` groups (G divides groups)."""
  return jnp.repeat(m, groups // m.shape[-2], axis=-2)


def decays(plan: Plan, cum, seg):
  """Decay factors of every chunk from the chunk-local cumulative log-decay cum [B, nc, Q, H].

  Returns eoff [B, nc, Q, H] (chunk start -> t, applied to the entering state), wst
  [B, nc, Q, H] (s -> chunk end), g [B, nc, H] (across the whole chunk) and lmat
  [B, nc, H, Q, Q] (s -> t for s <= t, zero above the diagonal). With segments, a factor is zero
  wherever its two ends lie in different segments.
  """
  q = plan.chunk
  last = cum[:, :, -1]                                               # [B, nc, H]
  cum_h = jnp.swapaxes(cum, 2, 3)                                    # [B, nc, H, Q]
  diff = cum_h[..., :, None] - cum_h[..., None, :]                   # [B, nc, H, t, s]
  vis = jnp.tril(jnp.ones((q, q), bool))[None, None, None]
  eoff = jnp.exp(cum)
  wst = jnp.exp(last[:, :, None, :] - cum)
  g = jnp.exp(last)
  if plan.segments:
    seg_prev = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)   # [B, nc]
    seg_last = seg[:, :, -1]
    vis = vis & (seg[:, :, None, :, None] == seg[:, :, None, None, :])
    eoff = jnp.where((seg == seg_prev[..., None])[..., None], eoff, 0.0)
    wst = jnp.where((seg == seg_last[..., None])[..., None], wst, 0.0)
    g = jnp.where((seg_last == seg_prev)[..., None], g, 0.0)
  # Masked before exp: above the diagonal cum_t - cum_s > 0 could overflow.
  lmat = jnp.exp(jnp.where(vis, diff, -jnp.inf))
  return eoff, wst, g, lmat


def _mm(spec, a, b, dtype):
  """einsum with operands cast to the matmul dtype and an fp32 result; fp32 operands in full
  precision (XLA's default on GPUs may be TF32, ~1e-3 relative error).

  On the CPU backend, low-precision operands are rounded to the matmul dtype and then widened
  to fp32: XLA:CPU has no bf16 x bf16 -> fp32 dot for some of these layouts (it fails at run
  time when the backward runs op by op), and the product of two bf16 numbers is exact in fp32,
  so the result is the same."""
  a, b = a.astype(dtype), b.astype(dtype)
  if jnp.dtype(dtype) != F32 and jax.default_backend() == "cpu":
    a, b, dtype = a.astype(F32), b.astype(F32), F32
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None
  return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision)


def matmul_dtype(dtype):
  """The dtype the chunked algorithm's matmuls run in: the input dtype, except float16, whose
  range (65504) the fp32 states and their products exceed long before fp32's or bf16's do
  (a linear-attention state summing a few thousand tokens of 8 x 8): fp32 for it."""
  return F32 if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def _views(plan: Plan, x, dt, cum, bm, cm, seg):
  q = plan.chunk
  xc = to_chunks(x, q)
  dtc = to_chunks(dt, q).astype(F32)
  cumc = to_chunks(cum, q)
  segc = to_chunks(seg, q) if plan.segments else None
  xdt = xc.astype(F32) * dtc[..., None]                              # x̃ = Δ x  [B, nc, Q, H, P]
  return xc, dtc, cumc, to_chunks(bm, q), to_chunks(cm, q), segc, xdt


def _forward(plan: Plan, x, dt, cum, bm, cm, d, h0, seg):
  """(y [B, Tp, H, P] in x.dtype, entering states [B, nc, H, P, N], final state) in fp32."""
  bsz, tp, h, p = x.shape
  gb, gc, n = bm.shape[2], cm.shape[2], bm.shape[3]
  gm = max(gb, gc)
  mm = matmul_dtype(x.dtype)
  xc, _, cumc, bc, cc, segc, xdt = _views(plan, x, dt, cum, bm, cm, seg)
  eoff, wst, g, lmat = decays(plan, cumc, segc)
  nc, q = plan.n_chunks, plan.chunk

  # 2. chunk states from zero, every chunk at once.
  xw = _by_group(xdt * wst[..., None], gb, 3)
  states = _mm("bcsgrp,bcsgn->bcgrpn", xw, bc, mm).reshape(bsz, nc, h, p, n)

  # 3. the recurrence over chunk boundaries.
  def carry(state, inp):
    g_c, s_c = inp
    return g_c[..., None, None] * state + s_c, state

  h_last, h_in = lax.scan(carry, h0, (jnp.swapaxes(g, 0, 1), jnp.swapaxes(states, 0, 1)))
  h_in = jnp.swapaxes(h_in, 0, 1)                                    # [B, nc, H, P, N]

  # 1. intra-chunk quadratic part; C Bᵀ once per group, decays per head.
  cb = _mm("bctgn,bcsgn->bcgts", _expand(cc, gm), _expand(bc, gm), mm)
  scores = _by_group(lmat, gm, 2) * cb[:, :, :, None]
  y = _mm("bcgrts,bcsgrp->bctgrp", scores, _by_group(xdt, gm, 3), mm).reshape(bsz, nc, q, h, p)
  # 4. the entering state read out by C, decayed from the chunk start.
  y_off = _mm("bctgn,bcgrpn->bctgrp", cc, _by_group(h_in, gc, 2), mm).reshape(y.shape)
  y = y + eoff[..., None] * y_off + d.astype(F32)[None, None, None, :, None] * xc.astype(F32)
  return y.reshape(bsz, tp, h, p).astype(x.dtype), h_in, h_last


def _backward(plan: Plan, x, dt, cum, bm, cm, d, h0, seg, h_in, dy, dh_last):
  """Cotangents of (x, dt, cum, B, C, D, h0) from those of (y, final state)."""
  bsz, tp, h, p = x.shape
  gb, gc, n = bm.shape[2], cm.shape[2], bm.shape[3]
  gm = max(gb, gc)
  mm = matmul_dtype(x.dtype)
  nc, q = plan.n_chunks, plan.chunk
  xc, dtc, cumc, bc, cc, segc, xdt = _views(plan, x, dt, cum, bm, cm, seg)
  eoff, wst, g, lmat = decays(plan, cumc, segc)
  dyc = to_chunks(dy, q).astype(F32)

  # State cotangents, in reverse over chunks: dH_out of chunk c is the cotangent of the state
  # leaving it; R_c = Σ_t eoff_t dy_t ⊗ C_t is what chunk c's outputs add to its entering state.
  r = _mm("bctgrp,bctgn->bcgrpn", _by_group(dyc * eoff[..., None], gc, 3), cc, mm)
  r = r.reshape(bsz, nc, h, p, n)

  def carry(dstate, inp):
    g_c, r_c = inp
    return g_c[..., None, None] * dstate + r_c, dstate

  dh0, dh_out = lax.scan(carry, dh_last.astype(F32), (jnp.swapaxes(g, 0, 1),
                                                      jnp.swapaxes(r, 0, 1)), reverse=True)
  dh_out = jnp.swapaxes(dh_out, 0, 1)                                # [B, nc, H, P, N]

  b_h, c_h = _expand(bc, h).astype(F32), _expand(cc, h).astype(F32)  # [B, nc, Q, H, N]
  cb = _mm("bctgn,bcsgn->bcgts", _expand(cc, gm), _expand(bc, gm), mm)
  amat = (_by_group(lmat, gm, 2) * cb[:, :, :, None]).reshape(lmat.shape)   # L ∘ C Bᵀ per head
  dx_dot = _mm("bcthp,bcshp->bchts", dyc, xdt, mm)                 # (dy_t · x̃_s)
  ldx = lmat * dx_dot

  # y_t = Σ_s A_ts x̃_s + eoff_t H C_t ; S = Σ_s wst_s x̃_s ⊗ B_s.
  dxdt = _mm("bchts,bcthp->bcshp", amat, dyc, mm)
  dxdt = dxdt + wst[..., None] * _mm("bchpn,bcshn->bcshp", dh_out, b_h, mm)
  dc_off = eoff[..., None] * _mm("bcthp,bchpn->bcthn", dyc, h_in, mm)
  dc_h = _mm("bchts,bcshn->bcthn", ldx, b_h, mm) + dc_off
  db_state = wst[..., None] * _mm("bcshp,bchpn->bcshn", xdt, dh_out, mm)
  db_h = _mm("bchts,bcthn->bcshn", ldx, c_h, mm) + db_state

  # d cum: L_ts depends on +cum_t and -cum_s; eoff_t on +cum_t; wst_s on cum_last - cum_s; g on
  # cum_last. For s = last the two wst terms cancel.
  z = amat * dx_dot
  state_term = jnp.sum(db_state * b_h, axis=-1)                     # [B, nc, Q, H]
  dcum = (jnp.swapaxes(z.sum(-1) - z.sum(-2), 2, 3) + jnp.sum(dc_off * c_h, axis=-1)
          - state_term)
  last_term = state_term.sum(2) + g * jnp.sum(dh_out * h_in, axis=(-2, -1))   # [B, nc, H]
  dcum = dcum.at[:, :, -1].add(last_term)

  dx = dxdt * dtc[..., None] + d.astype(F32)[None, None, None, :, None] * dyc
  ddt = jnp.sum(dxdt * xc.astype(F32), axis=-1)
  dd = jnp.sum(dyc * xc.astype(F32), axis=(0, 1, 2, 4))
  db = _by_group(db_h, gb, 3).sum(4)
  dc = _by_group(dc_h, gc, 3).sum(4)
  unchunk = lambda v: v.reshape(bsz, tp, *v.shape[3:])  # noqa: E731
  return (unchunk(dx).astype(x.dtype), unchunk(ddt).astype(dt.dtype), unchunk(dcum),
          unchunk(db).astype(bm.dtype), unchunk(dc).astype(cm.dtype), dd.astype(d.dtype), dh0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ssd_chunked(plan: Plan, x, dt, cum, bm, cm, d, h0, seg):
  """Chunked SSD on padded inputs: x [B, Tp, H, P], dt/cum [B, Tp, H] (cum fp32, chunk-local),
  B [B, Tp, GB, N], C [B, Tp, GC, N], D [H], h0 [B, H, P, N] fp32, seg [B, Tp] runs or None.
  Returns (y [B, Tp, H, P] in x.dtype, final state fp32)."""
  y, _, h_last = _forward(plan, x, dt, cum, bm, cm, d, h0, seg)
  return y, h_last


def _fwd(plan, x, dt, cum, bm, cm, d, h0, seg):
  y, h_in, h_last = _forward(plan, x, dt, cum, bm, cm, d, h0, seg)
  y, h_in = checkpoint_name(y, SSD_OUT), checkpoint_name(h_in, SSD_STATES)
  h_last = checkpoint_name(h_last, SSD_FINAL_STATE)
  return (y, h_last), (x, dt, cum, bm, cm, d, h0, seg, h_in)


def _bwd(plan, res, cts):
  x, dt, cum, bm, cm, d, h0, seg, h_in = res
  dy, dh_last = cts
  grads = _backward(plan, x, dt, cum, bm, cm, d, h0, seg, h_in, dy, dh_last)
  return (*grads, None)


ssd_chunked.defvjp(_fwd, _bwd)
