"""Quantized decode attention in Pallas (Triton): the codes are read from memory and
dequantized in registers; no full-precision copy of the cache is ever written.

Grid (B, Hkv, splits). Program (b, g, s) serves the query heads of KV head g (R of them, padded
to 16 rows: the smallest tl.dot) over a share of the visible key groups of the quantized part,
positions below G·floor(pos / G) (split-K as in flash-decoding: a decode step has only B·Hkv
rows of work, too few programs to fill the GPU's SMs); the quantized part ends where the
full-precision ring begins (`KVQuant.exact_from`). One key group of G tokens per iteration,
so its key scale and zero are one row per channel. Keys: for each of the 8 / bits planar
fields f, channels f·W .. f·W + W - 1 have codes (byte >> f·bits) & mask, and
scores += q_f · (code · scale + zero)ᵀ. Values are quantized per token, so their scale
multiplies the probabilities instead: for value group j (Gv channels within one field),
out_j += (p ⊙ scale_j) · code_j + p · zero_j. Windows and sinks (uniform across heads) skip
the key groups no query sees. Each program returns its unnormalized accumulator, running max
(base 2) and denominator; the api adds the residual (the current group, at full precision,
read in XLA) and merges the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memx.kernels.attention.pallas_gpu import _dot as dot
from memx.kernels.kv_quant.cache import QuantCache

LOG2E = 1.4426950408889634
NEG = -1e30   # finite: an empty split's max stays finite, so merging never sees inf - inf
MIN_ROWS = 16


def _kernel(pos_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref,
            acc_ref, m_ref, l_ref, *, bits: int, group: int, vgroup: int, head_dim: int,
            residual: int, left: int | None, sink: int, scale: float, splits: int):
  per = 8 // bits
  w = head_dim // per
  low = jnp.uint8(2 ** bits - 1)
  n_vg = head_dim // vgroup
  rows = q_ref.shape[0]
  dt = q_ref.dtype
  c = scale * LOG2E
  pos = pos_ref[0]
  split = pl.program_id(2)
  hi = jnp.maximum(pos // group - residual // group, 0)    # key groups [0, hi) are quantized
  lo = 0 if left is None else jnp.minimum(jnp.maximum((pos - left) // group, 0), hi)
  share = (hi - lo + splits - 1) // splits
  first = lo + split * share
  last = jnp.minimum(first + share, hi)
  qf = [q_ref[:, pl.ds(f * w, w)] for f in range(per)]          # [rows, W] per field

  def visit(j, carry):
    m, denom, accs = carry
    t0 = j * group
    kb = kc_ref[pl.ds(t0, group), :]                               # [G, W] uint8
    scores = jnp.zeros((rows, group), jnp.float32)
    for f in range(per):
      code = ((kb >> jnp.uint8(f * bits)) & low).astype(jnp.float32)
      ks = ks_ref[j, pl.ds(f * w, w)].astype(jnp.float32)
      kz = kz_ref[j, pl.ds(f * w, w)].astype(jnp.float32)
      scores = scores + dot(qf[f], (code * ks[None, :] + kz[None, :]).astype(dt), trans_b=True)
    t = t0 + jnp.arange(group)
    vis = jnp.ones((group,), jnp.bool_) if left is None else (pos - t <= left) | (t < sink)
    scores = jnp.where(vis[None, :], scores * c, NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.where(vis[None, :], jnp.exp2(scores - m_new[:, None]), 0.0)
    corr = jnp.exp2(m - m_new)
    new = []
    for jv in range(n_vg):
      f, i0 = divmod(jv * vgroup, w)
      vb = vc_ref[pl.ds(t0, group), pl.ds(i0, vgroup)]             # [G, Gv] uint8
      code = ((vb >> jnp.uint8(f * bits)) & low).astype(jnp.float32).astype(dt)
      vs = vs_ref[pl.ds(t0, group), jv].astype(jnp.float32)       # [G]: per token
      vz = vz_ref[pl.ds(t0, group), jv].astype(jnp.float32)
      pv = dot((p * vs[None, :]).astype(dt), code)
      new.append(accs[jv] * corr[:, None] + pv + jnp.sum(p * vz[None, :], axis=1)[:, None])
    return m_new, denom * corr + jnp.sum(p, axis=1), tuple(new)

  carry = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
           tuple(jnp.zeros((rows, vgroup), jnp.float32) for _ in range(n_vg)))
  if left is not None and sink:
    # Sink groups below the window: split 0 visits them (once).
    n_sink = jnp.where(split == 0, jnp.minimum((sink + group - 1) // group, lo), 0)
    carry = jax.lax.fori_loop(0, n_sink, visit, carry)
  m, denom, accs = jax.lax.fori_loop(first, last, visit, carry)
  for jv in range(n_vg):
    acc_ref[:, pl.ds(jv * vgroup, vgroup)] = accs[jv]
  m_ref[...] = m
  l_ref[...] = denom


def quantized_part(q, cache: QuantCache, pos, *, left: int | None, sink: int, scale: float,
                   splits: int, num_warps: int = 4, num_stages: int = 2,
                   interpret: bool = False):
  """The quantized part's (acc [B, Hkv, splits, Rp, K], m [B, Hkv, splits, Rp] base 2,
  l [B, Hkv, splits, Rp]) for q [B, Hkv, Rp, K] (rows padded) at position pos."""
  b, g, rows, d = q.shape
  spec = cache.spec
  slots, width = cache.k_codes.shape[1], cache.k_codes.shape[3]
  n_vg = cache.v_scale.shape[3]
  pos = jnp.reshape(jnp.asarray(pos, jnp.int32), (1,))
  in_specs = [
      pl.BlockSpec((1,), lambda i, j, s: (0,)),
      pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)),
      pl.BlockSpec((None, slots, None, width), lambda i, j, s: (i, 0, j, 0)),
      pl.BlockSpec((None, slots // spec.group, None, d), lambda i, j, s: (i, 0, j, 0)),
      pl.BlockSpec((None, slots // spec.group, None, d), lambda i, j, s: (i, 0, j, 0)),
      pl.BlockSpec((None, slots, None, width), lambda i, j, s: (i, 0, j, 0)),
      pl.BlockSpec((None, slots, None, n_vg), lambda i, j, s: (i, 0, j, 0)),
      pl.BlockSpec((None, slots, None, n_vg), lambda i, j, s: (i, 0, j, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, g, splits, rows, d), jnp.float32),
               jax.ShapeDtypeStruct((b, g, splits, rows), jnp.float32),
               jax.ShapeDtypeStruct((b, g, splits, rows), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, None, rows, d), lambda i, j, s: (i, j, s, 0, 0)),
               pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
               pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0))]
  stored = sum(x.size * x.dtype.itemsize for x in (cache.k_codes, cache.k_scale, cache.k_zero,
                                                   cache.v_codes, cache.v_scale, cache.v_zero))
  cost = pl.CostEstimate(flops=4 * b * g * rows * slots * d, transcendentals=b * g * rows * slots,
                         bytes_accessed=stored)
  kernel = functools.partial(_kernel, bits=spec.bits, group=spec.group,
                             vgroup=spec.value_group(d), head_dim=d, residual=spec.residual,
                             left=left, sink=sink,
                             scale=scale, splits=splits)
  return pl.pallas_call(
      kernel, grid=(b, g, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, cost_estimate=cost, name="memx_kv_quant_decode",
  )(pos, q, cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale,
    cache.v_zero)
