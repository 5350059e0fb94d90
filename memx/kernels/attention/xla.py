"""Blockwise online-softmax attention in plain JAX (FlashAttention-2, Dao 2023, Alg. 1 and 2).

Runs on every backend; the CPU default. The forward walks query blocks (`lax.map`) and, for
each, only the key blocks its schedule lists (FULL tiles unmasked, then PARTIAL tiles masked),
keeping the running max m, denominator l and unnormalised output in fp32. A custom VJP saves
only the output and the base-2 log-sum-exp per row; the backward recomputes probabilities tile
by tile (one pass over key blocks, dQ accumulated in an fp32 carry). Memory is linear in the
sequence length: the largest temporary is one [block_q, block_k] tile of scores per head.

Per-head masks run one blockwise pass per group of heads that share a mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from memx.kernels import ATTENTION_LSE, ATTENTION_OUT
from memx.kernels.attention import _schedule as sched
from memx.kernels.attention.config import BlockSizes
from memx.kernels.attention.mask import Mask
from memx.kernels.attention.reference import MASK_VALUE, SegmentIds, split_segment_ids
from memx.typing import Array, Float

LOG2E = math.log2(math.e)
# Base-2 log-sum-exp stored for rows that see no key: exp2(score - LSE_EMPTY) == 0 in the
# backward, so such rows get zero gradients instead of NaN.
LSE_EMPTY = -MASK_VALUE


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one blockwise call (hashable: a custom_vjp nondiff argument)."""

  mask: Mask          # head-uniform
  t: int              # real query length
  s: int              # real key length
  t_pad: int
  s_pad: int
  blocks: BlockSizes
  scale: float
  segments: bool


def _tile_scores(q_blk, k_blk, c):
  """Scaled base-2 logits of one tile: [B, bq, G, R, K] x [B, bk, G, K] -> [B, G, R, bq, bk]."""
  return jnp.einsum("bqgrd,bkgd->bgrqk", q_blk, k_blk, preferred_element_type=jnp.float32) * c


def _tile_mask(plan: _Plan, rule, q0, k0, bq, bk, qseg_blk, kseg_blk):
  """Visibility [B or 1, 1, 1, bq, bk] of a PARTIAL tile (FULL tiles need none)."""
  q_pos = plan.mask.q_offset + q0 + jnp.arange(bq)
  k_pos = k0 + jnp.arange(bk)
  vis = sched.visible(rule, q_pos, k_pos, *sched.uniform_params(plan.mask))[None, None, None]
  if plan.segments:
    vis = vis & (qseg_blk[:, :, None] == kseg_blk[:, None, :])[:, None, None]
  return vis


def _tables(plan: _Plan, q_seg, kv_seg, bq: int, bk: int, transpose: bool):
  """Tile schedule for one pass; with segment ids, refined for the whole batch at once."""
  table, counts = sched.schedule((plan.mask,), plan.t, plan.s, bq, bk, transpose, plan.t_pad,
                                 plan.s_pad)
  if not plan.segments:
    return jnp.asarray(table[0]), jnp.asarray(counts[0])
  if table.shape[-2:] == (1, 1):
    # One tile: nothing to skip, and a run-time schedule would keep its loops (XLA removes
    # static one-trip loops: at T = 512, B = 4 the dynamic one cost 1.6x time and 1.6x
    # temporaries). Static, with the tile masked: segments may split a FULL one.
    counts = counts.copy()
    counts[..., 0] = 0
    return jnp.asarray(table[0]), jnp.asarray(counts[0])
  q_rng, k_rng = sched.segment_ranges(q_seg, bq), sched.segment_ranges(kv_seg, bk)
  outer, inner = (k_rng, q_rng) if transpose else (q_rng, k_rng)
  table, counts = sched.segment_schedule(table, counts, outer, inner, union_batch=True)
  return table[0, 0], counts[0, 0]


def _forward(plan: _Plan, q, k, v, q_seg, kv_seg):
  """o [B, Tp, G, R, V] (q.dtype) and base-2 lse [B, G, R, Tp] (fp32) on padded inputs."""
  b, t_pad, g, r, _ = q.shape
  dv = v.shape[-1]
  bq, bk = plan.blocks.block_q, plan.blocks.block_k
  table, counts = _tables(plan, q_seg, kv_seg, bq, bk, transpose=False)
  rule = sched.rule_for((plan.mask,), plan.s, plan.s_pad)
  c = plan.scale * LOG2E

  def q_block(qb):
    q0 = qb * bq
    q_blk = lax.dynamic_slice_in_dim(q, q0, bq, axis=1)
    qseg_blk = lax.dynamic_slice_in_dim(q_seg, q0, bq, axis=1) if plan.segments else None

    def body(j, carry, elementwise):
      m_prev, l_prev, acc_prev = carry
      k0 = table[qb, j] * bk
      k_blk = lax.dynamic_slice_in_dim(k, k0, bk, axis=1)
      v_blk = lax.dynamic_slice_in_dim(v, k0, bk, axis=1)
      s = _tile_scores(q_blk, k_blk, c)
      if elementwise:
        kseg_blk = lax.dynamic_slice_in_dim(kv_seg, k0, bk, axis=1) if plan.segments else None
        vis = _tile_mask(plan, rule, q0, k0, bq, bk, qseg_blk, kseg_blk)
        # -inf (not MASK_VALUE) so exp2 gives exact zeros even while m is still MASK_VALUE.
        s = jnp.where(vis, s, -jnp.inf)
      # Online softmax (FA2 eq. after Alg. 1 line 10): rescale what we have by exp2(m - m_new).
      m_new = jnp.maximum(m_prev, s.max(-1))
      corr = jnp.exp2(m_prev - m_new)
      p = jnp.exp2(s - m_new[..., None])
      l_new = l_prev * corr + p.sum(-1)
      pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), v_blk,
                      preferred_element_type=jnp.float32)
      return m_new, l_new, acc_prev * corr[..., None] + pv

    # m starts at a finite MASK_VALUE so exp2(m_prev - m_new) is never exp2(-inf + inf).
    init = (jnp.full((b, g, r, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, g, r, bq), jnp.float32),
            jnp.zeros((b, g, r, bq, dv), jnp.float32))
    n_full, n_tot = counts[qb, 0], counts[qb, 1]
    carry = lax.fori_loop(0, n_full, functools.partial(body, elementwise=False), init)
    m, den, acc = lax.fori_loop(n_full, n_tot, functools.partial(body, elementwise=True),
                                carry)
    o = acc / jnp.where(den == 0.0, 1.0, den)[..., None]
    lse = jnp.where(den > 0.0, m + jnp.log2(jnp.where(den > 0.0, den, 1.0)), LSE_EMPTY)
    return o.astype(q.dtype), lse

  o_blocks, lse_blocks = lax.map(q_block, jnp.arange(t_pad // bq))
  o = jnp.moveaxis(o_blocks, 0, 3).reshape(b, g, r, t_pad, dv)      # [B, G, R, Tp, V]
  o = jnp.transpose(o, (0, 3, 1, 2, 4))
  lse = jnp.moveaxis(lse_blocks, 0, 3).reshape(b, g, r, t_pad)
  return o, lse


def _backward(plan: _Plan, q, k, v, q_seg, kv_seg, o, lse, do):
  """dq, dk, dv on padded inputs: one pass over key blocks (FA2 Alg. 2)."""
  b, t_pad, g, r, dk_ = q.shape
  bq, bk = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
  table, counts = _tables(plan, q_seg, kv_seg, bq, bk, transpose=True)
  rule = sched.rule_for((plan.mask,), plan.s, plan.s_pad)
  c = plan.scale * LOG2E
  # delta_i = rowsum(dO_i * O_i) (FA2 Alg. 2 line 4), fp32, [B, G, R, Tp].
  delta = jnp.einsum("bqgrd,bqgrd->bgrq", do.astype(jnp.float32), o.astype(jnp.float32))

  def k_block(dq_acc, kb):
    k0 = kb * bk
    k_blk = lax.dynamic_slice_in_dim(k, k0, bk, axis=1)
    v_blk = lax.dynamic_slice_in_dim(v, k0, bk, axis=1)
    kseg_blk = lax.dynamic_slice_in_dim(kv_seg, k0, bk, axis=1) if plan.segments else None

    def body(j, carry, elementwise):
      dk_acc, dv_acc, dq_acc = carry
      q0 = table[kb, j] * bq
      q_blk = lax.dynamic_slice_in_dim(q, q0, bq, axis=1)
      do_blk = lax.dynamic_slice_in_dim(do, q0, bq, axis=1)
      lse_blk = lax.dynamic_slice_in_dim(lse, q0, bq, axis=3)
      delta_blk = lax.dynamic_slice_in_dim(delta, q0, bq, axis=3)
      s = _tile_scores(q_blk, k_blk, c)
      if elementwise:
        qseg_blk = lax.dynamic_slice_in_dim(q_seg, q0, bq, axis=1) if plan.segments else None
        s = jnp.where(_tile_mask(plan, rule, q0, k0, bq, bk, qseg_blk, kseg_blk), s, -jnp.inf)
      p = jnp.exp2(s - lse_blk[..., None])                          # [B, G, R, bq, bk]
      dv_acc = dv_acc + jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(do.dtype), do_blk,
                                   preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqgrd,bkgd->bgrqk", do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_blk[..., None])).astype(q.dtype)        # dL/d(scaled logits)
      dk_acc = dk_acc + jnp.einsum("bgrqk,bqgrd->bkgd", ds, q_blk,
                                   preferred_element_type=jnp.float32)
      dq_blk = jnp.einsum("bgrqk,bkgd->bqgrd", ds, k_blk, preferred_element_type=jnp.float32)
      dq_old = lax.dynamic_slice_in_dim(dq_acc, q0, bq, axis=1)
      dq_acc = lax.dynamic_update_slice_in_dim(dq_acc, dq_old + dq_blk, q0, axis=1)
      return dk_acc, dv_acc, dq_acc

    init = (jnp.zeros((b, bk, g, dk_), jnp.float32),
            jnp.zeros((b, bk, g, v.shape[-1]), jnp.float32), dq_acc)
    n_full, n_tot = counts[kb, 0], counts[kb, 1]
    carry = lax.fori_loop(0, n_full, functools.partial(body, elementwise=False), init)
    dk_acc, dv_acc, dq_acc = lax.fori_loop(
        n_full, n_tot, functools.partial(body, elementwise=True), carry)
    return dq_acc, (dk_acc * plan.scale, dv_acc)

  dq_acc = jnp.zeros(q.shape, jnp.float32)
  dq_acc, (dk_blocks, dv_blocks) = lax.scan(k_block, dq_acc, jnp.arange(plan.s_pad // bk))
  dk = jnp.moveaxis(dk_blocks, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dv_blocks, 0, 1).reshape(v.shape)
  return (dq_acc * plan.scale).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(plan: _Plan, q, k, v, q_seg, kv_seg):
  return _forward(plan, q, k, v, q_seg, kv_seg)[0]


def _blockwise_fwd(plan, q, k, v, q_seg, kv_seg):
  o, lse = _forward(plan, q, k, v, q_seg, kv_seg)
  o, lse = checkpoint_name(o, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)
  # Residuals: the inputs plus O and the log-sum-exp only; no [T, S] tensor survives.
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _blockwise_bwd(plan, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  dq, dk, dv = _backward(plan, q, k, v, q_seg, kv_seg, o, lse, do)
  return dq, dk, dv, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _uniform(q, k, v, q_seg, kv_seg, *, mask: Mask, scale: float, blocks: BlockSizes):
  """One head-uniform mask: q [B, T, H, K], k/v [B, S, G, K]; pads, runs, unpads."""
  b, t, h, _ = q.shape
  s, g = k.shape[1], k.shape[2]
  t_pad = sched.round_up(t, max(blocks.block_q, blocks.block_q_dkv))
  s_pad = sched.round_up(s, max(blocks.block_k, blocks.block_k_dkv))
  plan = _Plan(mask=mask, t=t, s=s, t_pad=t_pad, s_pad=s_pad, blocks=blocks, scale=scale,
               segments=q_seg is not None)
  q5 = sched.pad_axis(q, 1, t_pad).reshape(b, t_pad, g, h // g, q.shape[-1])
  k_p, v_p = sched.pad_axis(k, 1, s_pad), sched.pad_axis(v, 1, s_pad)
  if q_seg is not None:
    q_seg, kv_seg = sched.pad_edge(q_seg, 1, t_pad), sched.pad_edge(kv_seg, 1, s_pad)
  o = _blockwise(plan, q5, k_p, v_p, q_seg, kv_seg)
  return o.reshape(b, t_pad, h, v.shape[-1])[:, :t]


@functools.partial(jax.jit, static_argnames=("mask", "scale", "block_sizes"))
def attention_xla(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G V"],
    *,
    mask: Mask,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H V"]:
  """Blockwise attention in plain JAX; same contract as `attention_reference`.

  fp32 scores, softmax statistics and accumulators; bf16 inputs feed the matmuls as bf16 and
  the output is in q.dtype. Differentiable through a custom VJP (FA2 backward).
  """
  b, t, h, dk = q.shape
  s, g = k.shape[1], k.shape[2]
  scale = dk ** -0.5 if scale is None else float(scale)
  explicit = block_sizes is not None
  blocks = (block_sizes or BlockSizes.get_default("xla")).fit(t, s, mask, explicit=explicit)
  q_seg, kv_seg = split_segment_ids(segment_ids)
  if q_seg is not None:
    q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
  masks = mask.heads(h)
  groups: dict[Mask, list[int]] = {}
  for i, m in enumerate(masks):
    groups.setdefault(m, []).append(i)
  if len(groups) == 1:
    return _uniform(q, k, v, q_seg, kv_seg, mask=masks[0], scale=scale, blocks=blocks)
  # Heterogeneous heads: one pass per group of heads sharing a mask. Each head of a group is
  # paired with its own kv head (a gather, so GQA kv heads may repeat inside a group).
  rep = h // g
  outs, order = [], []
  for m, heads in groups.items():
    kv_heads = [i // rep for i in heads]
    o = _uniform(_heads(q, heads), _heads(k, kv_heads), _heads(v, kv_heads), q_seg, kv_seg,
                 mask=m, scale=scale, blocks=blocks)
    outs.append(o)
    order.extend(heads)
  inverse = [0] * h
  for pos, head in enumerate(order):
    inverse[head] = pos
  return _heads(jnp.concatenate(outs, axis=2), inverse)


def _heads(x, idx: list[int]):
  """x[:, :, idx] for a static index list, as slices (one per run of consecutive heads) and
  broadcasts (repeated heads), not a gather: a gather's transpose is a scatter-add, which XLA
  may spend seconds constant-folding when the cotangent is a constant (a summed loss)."""
  parts, i = [], 0
  while i < len(idx):
    j = i + 1
    if j < len(idx) and idx[j] == idx[i]:           # a head repeated (GQA kv heads)
      while j < len(idx) and idx[j] == idx[i]:
        j += 1
      one = x[:, :, idx[i]:idx[i] + 1]
      parts.append(jnp.broadcast_to(one, one.shape[:2] + (j - i,) + one.shape[3:]))
    else:                                           # a run of consecutive heads
      while j < len(idx) and idx[j] == idx[j - 1] + 1:
        j += 1
      parts.append(x[:, :, idx[i]:idx[j - 1] + 1])
    i = j
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)
