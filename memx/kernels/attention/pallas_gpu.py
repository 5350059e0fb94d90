"""Pallas (Triton) GPU attention kernels: FlashAttention-2 forward, dK/dV and dQ passes.

Algorithm (Dao 2023, "FlashAttention-2", Alg. 1 forward, Alg. 2 backward):
  * forward: the grid is (query block, batch, query head); each program keeps its query tile
    [block_q, D] in registers/SRAM and walks the key tiles its schedule lists, with the running
    row max m, denominator l and the unnormalised output in fp32 (online softmax, base 2 with
    log2(e) folded into the scale). It writes O and the base-2 log-sum-exp per row.
  * dK/dV: the grid is (key block, batch, kv head); each program holds one K/V tile and its
    fp32 dK/dV accumulators, loops over the query heads that share this kv head (GQA without
    repeating K/V in memory) and over the query tiles the transposed schedule lists.
  * dQ: the grid is (query block, batch, query head); loops over key tiles like the forward.
    With `BlockSizes.dq_atomic` the dK/dV pass instead adds each tile's dS K into an fp32 dQ
    with atomic adds, and this pass does not run (5 tile matmuls instead of 7).
Block skipping: schedules (`_schedule.py`, from `Mask.block_layout`) list only non-empty tiles,
FULL ones first (no element mask) then PARTIAL ones (mask built from iotas and a few scalars).
Each row's leading run of consecutive FULL tiles is walked as first + j, with no table read per
tile (`_walk`); under segment ids that is the row's own document, so packed rows keep it too.
Segment ids refine the schedules per batch row before the launch (ranges per tile), and mask
element-wise. Inputs are zero-padded to whole tiles and to a power-of-two head dim >= 16 before
the kernels run, so no load needs a bounds mask; padded keys are masked out as PARTIAL tiles.

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

from memx.kernels import ATTENTION_LSE, ATTENTION_OUT
from memx.kernels.attention import _schedule as sched
from memx.kernels.attention.config import BlockSizes
from memx.kernels.attention.mask import Mask
from memx.kernels.attention.reference import MASK_VALUE, SegmentIds, split_segment_ids
from memx.typing import Array, Float

LOG2E = math.log2(math.e)
# Base-2 log-sum-exp for rows that see no key (see xla.py): keeps their gradients at zero.
LSE_EMPTY = -MASK_VALUE


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  masks: tuple[Mask, ...]   # one per query head, or a single one when all heads agree
  rule: sched.Rule
  t: int
  s: int
  t_pad: int
  s_pad: int
  num_heads: int
  num_kv_heads: int
  d_pad: int
  blocks: BlockSizes
  scale: float
  segments: bool
  interpret: bool

  @property
  def per_head(self) -> bool:
    return len(self.masks) > 1

  @property
  def rep(self) -> int:
    return self.num_heads // self.num_kv_heads

  def warps(self, field: str) -> int:
    n = getattr(self.blocks, field)
    return n if n is not None else (4 if self.d_pad <= 64 else 8)


def _whole(x) -> pl.BlockSpec:
  """BlockSpec that hands the kernel the entire (small) array: schedules, per-head params."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _schedules(plan: _Plan, q_seg, kv_seg, bq: int, bk: int, transpose: bool):
  """(table, counts, visited tiles, table_loop) for one pass: static numpy, or refined by
  segment ids (batch axis B). counts [..., 3]: `sched.with_prefix`. table_loop: whether some
  row has FULL tiles past its contiguous prefix (static tables: known; refined ones: assumed),
  i.e. whether the kernels need their FULL loop that reads the table."""
  table, counts = sched.schedule(plan.masks, plan.t, plan.s, bq, bk, transpose, plan.t_pad,
                                 plan.s_pad)
  if not plan.segments:
    counts3 = sched.with_prefix(table, counts)
    return (jnp.asarray(table)[None], jnp.asarray(counts3)[None], sched.visited_tiles(counts),
            bool((counts3[..., 2] < counts3[..., 0]).any()))
  q_rng, k_rng = sched.segment_ranges(q_seg, bq), sched.segment_ranges(kv_seg, bk)
  outer, inner = (k_rng, q_rng) if transpose else (q_rng, k_rng)
  table_b, counts_b = sched.segment_schedule(table, counts, outer, inner)
  return table_b, sched.with_prefix(table_b, counts_b), sched.visited_tiles(counts), True


def _walk(body, cnt_ref, row: tuple, carry, table_loop: bool):
  """Runs body(j, carry, kind) over a schedule row's visited tiles: the contiguous prefix of
  its FULL tiles ("fast": block first + j, no table read), the rest of its FULL tiles
  ("table"; only emitted with table_loop), then its PARTIAL tiles ("partial": masked)."""
  n_full, n_tot, n_fast = (cnt_ref[(*row, i)] for i in range(3))
  carry = lax.fori_loop(0, n_fast, functools.partial(body, kind="fast"), carry)
  if table_loop:
    carry = lax.fori_loop(n_fast, n_full, functools.partial(body, kind="table"), carry)
  return lax.fori_loop(n_full, n_tot, functools.partial(body, kind="partial"), carry)


def _tile_index(tbl_ref, row: tuple, j, first, kind: str):
  """The j-th visited inner block of a schedule row: first + j in the "fast" loop (one table
  read per row, hoisted), else the table entry."""
  if kind == "fast":
    return first + j
  return tbl_ref[(*row, j)]


def _head_scalars(plan: _Plan, hp_ref, h):
  """(window_left, window_right, n_sink) of query head h: static ints or loaded scalars."""
  if plan.per_head:
    return hp_ref[h, 0], hp_ref[h, 1], hp_ref[h, 2]
  return sched.uniform_params(plan.masks[0])


def _exp2(plan: _Plan, x):
  """2**x in fp32: one `ex2.approx.ftz.f32` per element with BlockSizes.exp2_ftz (compiled
  only; the interpreter cannot run PTX), else jnp.exp2."""
  if not plan.blocks.exp2_ftz or plan.interpret:
    return jnp.exp2(x)
  return plgpu.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _dot(a, b, *, trans_a=False, trans_b=False):
  """fp32-accumulated dot. fp32 operands run in full precision: Triton's default for them is
  TF32 (relative error ~5e-4, measured on an H200), which fp32 callers did not ask for."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _tile_visibility(plan: _Plan, q_pos, k_pos, params, qseg, kseg, transpose: bool = False):
  """bool visibility of a PARTIAL tile: [bq, bk], or [bk, bq] with transpose.

  FULL tiles need none: the segment-refined schedules keep a tile FULL only when its query
  and key blocks lie in one and the same segment.
  """
  vis = sched.visible(plan.rule, q_pos, k_pos, *params, transpose=transpose)
  if plan.segments:
    same = (kseg[:, None] == qseg[None, :]) if transpose else (qseg[:, None] == kseg[None, :])
    vis = vis & same
  return vis


def _unpack(refs, plan: _Plan, names: tuple[str, ...]):
  """Names the kernel's refs: optional inputs (head params, segment ids) appear only if used."""
  it = iter(refs)
  out = {"tbl": next(it), "cnt": next(it)}
  out["off"] = next(it) if plan.rule.dynamic_offset else None
  out["hp"] = next(it) if plan.per_head else None
  out["qseg"], out["kseg"] = (next(it), next(it)) if plan.segments else (None, None)
  for name in names:
    out[name] = next(it)
  return out


# --- forward ---------------------------------------------------------------------------------


def _fwd_kernel(*refs, plan: _Plan, n_q: int, table_loop: bool = True):
  r = _unpack(refs, plan, ("q", "k", "v", "o", "lse"))
  bq, bk = plan.blocks.block_q, plan.blocks.block_k
  # Grid axis 0 runs query blocks last-to-first: under causal masks the late blocks carry the
  # most tiles, and starting them first evens out the tail of the launch.
  qb = n_q - 1 - pl.program_id(0)
  b, h = pl.program_id(1), pl.program_id(2)
  tb = b if plan.segments else 0
  th = h if plan.per_head else 0
  params = _head_scalars(plan, r["hp"], h)
  c = plan.scale * LOG2E

  q = r["q"][...]                                       # [bq, D]: stays on chip for the loop
  offset = r["off"][0] if plan.rule.dynamic_offset else plan.rule.q_offset
  q_pos = offset + qb * bq + jnp.arange(bq)
  qseg = r["qseg"][...] if plan.segments else None

  first = r["tbl"][tb, th, qb, 0]

  def body(j, carry, kind):
    elementwise = kind == "partial"
    m_prev, l_prev, acc = carry
    kb = _tile_index(r["tbl"], (tb, th, qb), j, first, kind)
    k0 = pl.multiple_of(kb * bk, bk)
    k = r["k"][pl.ds(k0, bk), :]
    # fp32 [bq, bk]. A positive scale is applied after the row max: max(s)·c = max(s·c), and
    # s·c - m is then one fused multiply-add per score, not a multiply and a subtraction (as
    # Triton's tutorial). A negative one scales the tile first (max would flip, and the mask's
    # -inf must come after it).
    s = _dot(q, k, trans_b=True)
    if c <= 0:
      s = s * c
    if elementwise:
      kseg = r["kseg"][pl.ds(k0, bk)] if plan.segments else None
      vis = _tile_visibility(plan, q_pos, k0 + jnp.arange(bk), params, qseg, kseg)
      # -inf, not MASK_VALUE: exp2 then yields exact zeros even while m is still MASK_VALUE.
      s = jnp.where(vis, s, -jnp.inf)
    if c > 0:
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1) * c)
      p = _exp2(plan, s * c - m_new[:, None])
    else:
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      p = _exp2(plan, s - m_new[:, None])
    corr = _exp2(plan, m_prev - m_new)
    l_new = l_prev * corr + jnp.sum(p, axis=1)
    v = r["v"][pl.ds(k0, bk), :]
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l_new, acc

  # Finite initial max: exp2(m_prev - m_new) never sees -inf - (-inf).
  init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, plan.d_pad), jnp.float32))
  m, den, acc = _walk(body, r["cnt"], (tb, th, qb), init, table_loop)
  # Rows that saw no key (l == 0) output zeros and get a huge lse (zero gradients later).
  seen = den > 0.0
  l_safe = jnp.where(seen, den, 1.0)
  r["o"][...] = (acc / l_safe[:, None]).astype(r["o"].dtype)
  r["lse"][...] = jnp.where(seen, m + jnp.log2(l_safe), LSE_EMPTY)


def _forward(plan: _Plan, q, k, v, q_seg, kv_seg, offset=None):
  """o [B, Tp, H, Dp] and base-2 lse [B, H, Tp] fp32 from padded inputs; `offset` (int32
  [1]) is the run-time query offset of a plan with rule.dynamic_offset."""
  b = q.shape[0]
  bq, bk = plan.blocks.block_q, plan.blocks.block_k
  n_q = plan.t_pad // bq
  if plan.rule.dynamic_offset:
    tbl, cnt = sched.dynamic_schedule(plan.masks, plan.rule, offset[0], bq, bk, plan.t_pad,
                                      plan.s_pad)
    tbl, cnt = tbl[None], sched.with_prefix(tbl, cnt)[None]
    # The cost estimate's tile count must be static: take the causal average.
    tiles = max(1, (n_q * (plan.s_pad // bk)) // 2) * len(plan.masks)
    table_loop = True
  else:
    tbl, cnt, tiles, table_loop = _schedules(plan, q_seg, kv_seg, bq, bk, transpose=False)
  rep, d = plan.rep, plan.d_pad
  args, specs = [tbl, cnt], [_whole(tbl), _whole(cnt)]
  if plan.rule.dynamic_offset:
    args.append(offset)
    specs.append(_whole(offset))
  if plan.per_head:
    hp = jnp.asarray(sched.head_params(plan.masks))
    args.append(hp)
    specs.append(_whole(hp))
  if plan.segments:
    args += [q_seg, kv_seg]
    specs += [pl.BlockSpec((None, bq), lambda i, b_, h: (b_, n_q - 1 - i)),
              pl.BlockSpec((None, plan.s_pad), lambda i, b_, h: (b_, 0))]
  args += [q, k, v]
  specs += [pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, n_q - 1 - i, h, 0)),
            pl.BlockSpec((None, plan.s_pad, None, d), lambda i, b_, h: (b_, 0, h // rep, 0)),
            pl.BlockSpec((None, plan.s_pad, None, d), lambda i, b_, h: (b_, 0, h // rep, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, plan.num_heads, plan.t_pad), jnp.float32)]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, n_q - 1 - i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, n_q - 1 - i))]
  per_bh = b * (1 if plan.per_head else plan.num_heads)
  cost = pl.CostEstimate(
      flops=4 * tiles * bq * bk * d * per_bh, transcendentals=tiles * bq * bk * per_bh,
      bytes_accessed=sum(x.size * x.dtype.itemsize for x in (q, k, v)) * 2)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan, n_q=n_q, table_loop=table_loop),
      grid=(n_q, b, plan.num_heads),
      in_specs=specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=plan.warps("num_warps_fwd"),
                                           num_stages=plan.blocks.num_stages_fwd),
      interpret=plan.interpret, cost_estimate=cost, name="memx_attention_fwd",
  )(*args)
  return o, lse


# --- backward: dK/dV ---------------------------------------------------------------------------


def _dkv_kernel(*refs, plan: _Plan, table_loop: bool = True):
  atomic = plan.blocks.dq_atomic
  r = _unpack(refs, plan, ("q", "k", "v", "do", "lse", "delta")
              + (("dq_zeros", "dk", "dv", "dq") if atomic else ("dk", "dv")))
  bq, bk = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
  kb, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tb = b if plan.segments else 0
  c = plan.scale * LOG2E
  k = r["k"][...]                                       # [bk, D]: resident for all q tiles
  v = r["v"][...]
  k_pos = kb * bk + jnp.arange(bk)
  kseg = r["kseg"][...] if plan.segments else None

  def one_head(rr, carry):
    """Accumulates the contribution of query head g * rep + rr (GQA: sum over the group)."""
    h = g * plan.rep + rr
    th = h if plan.per_head else 0
    params = _head_scalars(plan, r["hp"], h)
    first = r["tbl"][tb, th, kb, 0]

    def body(j, carry, kind):
      elementwise = kind == "partial"
      dk, dv = carry
      qblk = _tile_index(r["tbl"], (tb, th, kb), j, first, kind)
      q0 = pl.multiple_of(qblk * bq, bq)
      q = r["q"][pl.ds(q0, bq), rr, :]
      do = r["do"][pl.ds(q0, bq), rr, :]
      lse = r["lse"][rr, pl.ds(q0, bq)]
      delta = r["delta"][rr, pl.ds(q0, bq)]
      # Transposed tile [bk, bq] (as in Triton's fused-attention tutorial): every dot below
      # then takes a register tensor as its left operand untransposed, and only loaded tiles
      # (q, do) are transposed, which costs nothing beyond their shared-memory layout.
      s_t = _dot(k, q, trans_b=True) * c
      if elementwise:
        qseg = r["qseg"][pl.ds(q0, bq)] if plan.segments else None
        q_pos = plan.rule.q_offset + q0 + jnp.arange(bq)
        vis = _tile_visibility(plan, q_pos, k_pos, params, qseg, kseg, transpose=True)
        s_t = jnp.where(vis, s_t, -jnp.inf)
      p_t = _exp2(plan, s_t - lse[None, :])               # probabilities, recomputed
      dv = dv + _dot(p_t.astype(do.dtype), do)
      dp_t = _dot(v, do, trans_b=True)
      ds_t = p_t * (dp_t - delta[None, :])                # FA2 Alg. 2 line 14 (no scale yet)
      dk = dk + _dot(ds_t.astype(q.dtype), q)
      if atomic:  # dQ_tile = dS K: this program's share of the query tile's gradient
        dq = _dot(ds_t.astype(k.dtype), k, trans_a=True) * plan.scale
        # (an array index: the interpreter's atomic rule rejects a Python int head index)
        plgpu.atomic_add(r["dq"], (pl.ds(q0, bq), jnp.asarray(rr, jnp.int32), slice(None)), dq)
      return dk, dv

    return _walk(body, r["cnt"], (tb, th, kb), carry, table_loop)

  init = (jnp.zeros((bk, plan.d_pad), jnp.float32), jnp.zeros((bk, plan.d_pad), jnp.float32))
  if plan.rep == 1:
    dk, dv = one_head(0, init)
  else:
    dk, dv = lax.fori_loop(0, plan.rep, one_head, init)
  r["dk"][...] = (dk * plan.scale).astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def _dkv(plan: _Plan, q, k, v, q_seg, kv_seg, do, lse, delta):
  b = q.shape[0]
  bq, bk = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
  tbl, cnt, _, table_loop = _schedules(plan, q_seg, kv_seg, bq, bk, transpose=True)
  rep, d = plan.rep, plan.d_pad
  args, specs = [tbl, cnt], [_whole(tbl), _whole(cnt)]
  if plan.per_head:
    hp = jnp.asarray(sched.head_params(plan.masks))
    args.append(hp)
    specs.append(_whole(hp))
  if plan.segments:
    args += [q_seg, kv_seg]
    specs += [pl.BlockSpec((None, plan.t_pad), lambda i, b_, g: (b_, 0)),
              pl.BlockSpec((None, bk), lambda i, b_, g: (b_, i))]
  q_spec = pl.BlockSpec((None, plan.t_pad, rep, d), lambda i, b_, g: (b_, 0, g, 0))
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda i, b_, g: (b_, i, g, 0))
  row_spec = pl.BlockSpec((None, rep, plan.t_pad), lambda i, b_, g: (b_, g, 0))
  args += [q, k, v, do, lse, delta]
  specs += [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  out_specs = [kv_spec, kv_spec]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  aliases = {}
  if plan.blocks.dq_atomic:  # fp32 dQ, zeroed here, summed into by every key block's program
    aliases = {len(args): 2}
    args.append(jnp.zeros(q.shape, jnp.float32))
    specs.append(q_spec)
    out_specs.append(q_spec)
    out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan, table_loop=table_loop),
      grid=(plan.s_pad // bk, b, plan.num_kv_heads),
      in_specs=specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=plan.warps("num_warps_bwd"),
                                           num_stages=plan.blocks.num_stages_bwd),
      interpret=plan.interpret, name="memx_attention_dkv",
  )(*args)


# --- backward: dQ ------------------------------------------------------------------------------


def _dq_kernel(*refs, plan: _Plan, n_q: int, table_loop: bool = True):
  r = _unpack(refs, plan, ("q", "k", "v", "do", "lse", "delta", "dq"))
  bq, bk = plan.blocks.block_q_dq, plan.blocks.block_k_dq
  qb = n_q - 1 - pl.program_id(0)
  b, h = pl.program_id(1), pl.program_id(2)
  tb = b if plan.segments else 0
  th = h if plan.per_head else 0
  params = _head_scalars(plan, r["hp"], h)
  c = plan.scale * LOG2E
  q, do = r["q"][...], r["do"][...]
  lse, delta = r["lse"][...], r["delta"][...]
  q_pos = plan.rule.q_offset + qb * bq + jnp.arange(bq)
  qseg = r["qseg"][...] if plan.segments else None

  first = r["tbl"][tb, th, qb, 0]

  def body(j, dq, kind):
    elementwise = kind == "partial"
    kblk = _tile_index(r["tbl"], (tb, th, qb), j, first, kind)
    k0 = pl.multiple_of(kblk * bk, bk)
    k = r["k"][pl.ds(k0, bk), :]
    v = r["v"][pl.ds(k0, bk), :]
    s = _dot(q, k, trans_b=True) * c
    if elementwise:
      kseg = r["kseg"][pl.ds(k0, bk)] if plan.segments else None
      vis = _tile_visibility(plan, q_pos, k0 + jnp.arange(bk), params, qseg, kseg)
      s = jnp.where(vis, s, -jnp.inf)
    p = _exp2(plan, s - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _walk(body, r["cnt"], (tb, th, qb), jnp.zeros((bq, plan.d_pad), jnp.float32),
             table_loop)
  r["dq"][...] = (dq * plan.scale).astype(r["dq"].dtype)


def _dq(plan: _Plan, q, k, v, q_seg, kv_seg, do, lse, delta):
  b = q.shape[0]
  bq, bk = plan.blocks.block_q_dq, plan.blocks.block_k_dq
  n_q = plan.t_pad // bq
  tbl, cnt, _, table_loop = _schedules(plan, q_seg, kv_seg, bq, bk, transpose=False)
  rep, d = plan.rep, plan.d_pad
  args, specs = [tbl, cnt], [_whole(tbl), _whole(cnt)]
  if plan.per_head:
    hp = jnp.asarray(sched.head_params(plan.masks))
    args.append(hp)
    specs.append(_whole(hp))
  if plan.segments:
    args += [q_seg, kv_seg]
    specs += [pl.BlockSpec((None, bq), lambda i, b_, h: (b_, n_q - 1 - i)),
              pl.BlockSpec((None, plan.s_pad), lambda i, b_, h: (b_, 0))]
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, n_q - 1 - i, h, 0))
  kv_spec = pl.BlockSpec((None, plan.s_pad, None, d), lambda i, b_, h: (b_, 0, h // rep, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, n_q - 1 - i))
  args += [q, k, v, do, lse, delta]
  specs += [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  return pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, n_q=n_q, table_loop=table_loop),
      grid=(n_q, b, plan.num_heads),
      in_specs=specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=plan.warps("num_warps_bwd"),
                                           num_stages=plan.blocks.num_stages_bwd),
      interpret=plan.interpret, name="memx_attention_dq",
  )(*args)


# --- custom VJP and entry point ----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, k, v, q_seg, kv_seg):
  return _forward(plan, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(plan, q, k, v, q_seg, kv_seg):
  o, lse = _forward(plan, q, k, v, q_seg, kv_seg)
  o, lse = checkpoint_name(o, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(plan, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  # delta_i = rowsum(dO_i * O_i) (FA2 Alg. 2 line 4), written as a multiply and a sum: one
  # fused elementwise+reduce in XLA (an einsum is a dot_general with 1x1 outputs, which a
  # backend may hand to a batched GEMM).
  delta = jnp.swapaxes(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
  do = do.astype(q.dtype)
  if plan.blocks.dq_atomic:
    dk, dv, dq = _dkv(plan, q, k, v, q_seg, kv_seg, do, lse, delta)
    return dq.astype(q.dtype), dk, dv, None, None
  dk, dv = _dkv(plan, q, k, v, q_seg, kv_seg, do, lse, delta)
  dq = _dq(plan, q, k, v, q_seg, kv_seg, do, lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def make_plan(q_shape, k_shape, *, mask: Mask, segments: bool, scale: float | None,
              block_sizes: BlockSizes | None, interpret: bool, itemsize: int) -> _Plan:
  """Validates sizes and fixes tiles, padding and per-head structure (no tracing). itemsize:
  bytes per input element, which picks the default tiles."""
  _, t, h, d = q_shape
  s, g = k_shape[1], k_shape[2]
  d_pad = max(16, 1 << (d - 1).bit_length())
  default = BlockSizes.get_default("pallas_gpu", itemsize=itemsize, head_dim=d_pad)
  blocks = (block_sizes or default).fit(t, s, mask, explicit=block_sizes is not None)
  masks = sched.dedupe_heads(mask.heads(h))
  t_pad = sched.round_up(t, max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
  s_pad = sched.round_up(s, max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
  return _Plan(
      masks=masks, rule=sched.rule_for(masks, s, s_pad), t=t, s=s, t_pad=t_pad, s_pad=s_pad,
      num_heads=h, num_kv_heads=g, d_pad=d_pad, blocks=blocks,
      scale=d ** -0.5 if scale is None else float(scale), segments=segments,
      interpret=interpret)


@functools.partial(jax.jit, static_argnames=("mask", "scale", "block_sizes", "interpret"))
def chunk_attention_pallas_gpu(q, k, v, start, *, mask: Mask, scale: float | None = None,
                               block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Forward-only `chunk_attention` (see chunk.py): the forward kernel above with the query
  offset `start` (an int32 scalar, may be traced) read at run time and its tile schedule built
  in XLA from it, so one compiled program serves a chunk at any offset and visits only the
  cache tiles the chunk can see."""
  t, s = q.shape[1], k.shape[1]
  plan = make_plan(q.shape, k.shape, mask=mask, segments=False, scale=scale,
                   block_sizes=block_sizes, interpret=interpret,
                   itemsize=jnp.dtype(q.dtype).itemsize)
  # Forward only: pad to the forward tiles alone (make_plan pads for the backward's too).
  t_pad = sched.round_up(t, plan.blocks.block_q)
  s_pad = sched.round_up(s, plan.blocks.block_k)
  rule = dataclasses.replace(sched.rule_for(plan.masks, s, s_pad), dynamic_offset=True)
  plan = dataclasses.replace(plan, t_pad=t_pad, s_pad=s_pad, rule=rule)
  qp = sched.pad_axis(sched.pad_axis(q, 1, plan.t_pad), 3, plan.d_pad)
  kp = sched.pad_axis(sched.pad_axis(k, 1, plan.s_pad), 3, plan.d_pad)
  vp = sched.pad_axis(sched.pad_axis(v, 1, plan.s_pad), 3, plan.d_pad)
  offset = jnp.reshape(jnp.asarray(start, jnp.int32), (1,))
  o, _ = _forward(plan, qp, kp, vp, None, None, offset)
  return o[:, :t, :, :q.shape[3]]


@functools.partial(jax.jit, static_argnames=("mask", "scale", "block_sizes", "interpret"))
def attention_pallas_gpu(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G K"],
    *,
    mask: Mask,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T H K"]:
  """FlashAttention-2 in Pallas/Triton; same contract as `attention_reference`.

  fp32 softmax statistics and accumulators, matmuls in the input dtype (bf16/fp16 on tensor
  cores; fp32 inputs use full-precision dots); output in q.dtype. Differentiable through
  hand-written dK/dV and dQ kernels.
  """
  b, t, h, d = q.shape
  s = k.shape[1]
  q_seg, kv_seg = split_segment_ids(segment_ids)
  plan = make_plan(q.shape, k.shape, mask=mask, segments=q_seg is not None, scale=scale,
                   block_sizes=block_sizes, interpret=interpret,
                   itemsize=jnp.dtype(q.dtype).itemsize)
  qp = sched.pad_axis(sched.pad_axis(q, 1, plan.t_pad), 3, plan.d_pad)
  kp = sched.pad_axis(sched.pad_axis(k, 1, plan.s_pad), 3, plan.d_pad)
  vp = sched.pad_axis(sched.pad_axis(v, 1, plan.s_pad), 3, plan.d_pad)
  if q_seg is not None:
    q_seg = sched.pad_edge(q_seg.astype(jnp.int32), 1, plan.t_pad)
    kv_seg = sched.pad_edge(kv_seg.astype(jnp.int32), 1, plan.s_pad)
  o = _flash(plan, qp, kp, vp, q_seg, kv_seg)
  del b, s
  return o[:, :t, :, :d]
