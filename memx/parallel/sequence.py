"""Sequence-parallel attention: ring (K/V around the ring) and all-to-all (Ulysses).

Two per-shard building blocks, pure functions of local arrays with explicit axis names, meant
to run inside `jax.shard_map` (check_vma=False):

* `ring_attention`: every device keeps its query block and passes its K/V block around a ring
  of `axis_size` devices with `lax.ppermute` (Liu et al. 2023, Ring Attention). At each hop it
  runs blockwise attention (FlashAttention-2 online softmax, fp32 running max / denominator /
  accumulator) of its queries against the K/V block it holds, so the full K/V never exists on
  one device. A custom VJP saves only O and the base-2 log-sum-exp; the backward walks the
  ring again and passes dK/dV (fp32) around with K/V, so each block's gradient arrives home
  after a full circle. GQA runs on [B, T, G, R, K] views: K/V are never repeated.
* `all_to_all_attention`: re-shards q/k/v from sequence to heads with one `lax.all_to_all`,
  runs the memx attention kernel on the whole sequence for H/n heads, and re-shards the
  output back (DeepSpeed-Ulysses, Jacobs et al. 2023).

Layouts: which positions a device holds. "contiguous" gives device d tokens [d·T/n, (d+1)·T/n);
under a causal mask device n-1 then does n times the work of device 0. "zigzag" splits the
sequence into 2n chunks and gives device d chunks d and 2n-1-d (MaxText's dual chunk swap);
"striped" gives device d tokens d, d+n, d+2n, ... (Brandon et al. 2023, Striped Attention).
Both make every device visit the same number of key tiles. The data arrive in the layout's
order (`permute_sequence`, with RoPE positions from `layout_positions`); outputs stay in it.

Masks: causal, windows (left/right), sinks, q_offset and segment ids. At every hop a device
lists the key tiles its mask leaves non-empty (from the tiles' position ranges: a few integer
ops per tile pair, computed in the kernel, so no per-device tables are baked into the
program), FULL tiles before PARTIAL ones, and the ring walks only the hops some device needs:
a left window of w tokens on contiguous shards walks ceil(w / (T/n)) + 1 hops. Sinks of a
windowed mask travel on a side channel (one small psum of the first n_sink keys to every
device) so they do not force the full ring. Per-head masks and block-sparse layouts are not
supported by the ring (all_to_all passes a head-uniform block-sparse mask to the kernel).

`sequence_parallel_attention` is the entry point on global arrays (it wraps the shard_map);
`sharded_attention` is what a layer calls: it routes to sequence parallelism when the active
rules split SEQ, else to `memx.kernels.attention.attention`, the unsharded reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from memx.kernels import ATTENTION_LSE, ATTENTION_OUT
from memx.kernels.attention import CAUSAL, BlockSizes, Mask, attention
from memx.kernels.attention.reference import MASK_VALUE, SegmentIds, split_segment_ids
from memx.parallel.axes import BATCH, HEADS, KV_HEADS, SEQ
from memx.parallel.constrain import active_mesh, active_rules, sequence_options
from memx.parallel.rules import logical_to_spec, mesh_axes_of
from memx.typing import Array, Float

Layout = Literal["contiguous", "zigzag", "striped"]
Method = Literal["ring", "all_to_all"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "striped")
METHODS: tuple[str, ...] = ("ring", "all_to_all")

LOG2E = math.log2(math.e)
# Base-2 LSE of rows that see no key: exp2(score - LSE_EMPTY) == 0, so zero gradients, no NaN.
LSE_EMPTY = -MASK_VALUE
EMPTY, PARTIAL, FULL = 0, 1, 2
# Largest default tile: each tile is one step of an XLA loop with fixed overhead.
DEFAULT_BLOCK = 512
# ... but a tile's fp32 scores [B, H, bq, bk] (and the probabilities, dP, dS of the backward)
# stay below this many elements (4 MiB each), or with a large batch they dominate memory.
TILE_ELEMENTS = 1 << 20


# --- layouts ------------------------------------------------------------------------------------

def _check_layout(seq_len: int, n: int, layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"sequence layout {layout!r} is not one of {LAYOUTS}")
  parts = 2 * n if layout == "zigzag" else n
  if seq_len % parts:
    raise ValueError(f"sequence length {seq_len} must be a multiple of {parts} for layout "
                     f"{layout!r} over {n} devices")


@functools.lru_cache(maxsize=64)
def _positions(seq_len: int, n: int, layout: str) -> np.ndarray:
  _check_layout(seq_len, n, layout)
  idx = np.arange(seq_len, dtype=np.int32)
  if layout == "contiguous":
    pos = idx.reshape(n, seq_len // n)
  elif layout == "striped":
    pos = idx.reshape(seq_len // n, n).T
  else:
    chunks = idx.reshape(2 * n, seq_len // (2 * n))
    pos = np.concatenate([chunks[:n], chunks[::-1][:n]], axis=1)
  pos = np.ascontiguousarray(pos)
  pos.flags.writeable = False
  return pos


def layout_positions(seq_len: int, n: int, layout: Layout) -> np.ndarray:
  """int32 [n, seq_len / n]: the sequence positions device d holds, in its local order.

  Flattened, it is the permutation that puts a natural-order sequence into the layout
  (`permute_sequence`) and the RoPE positions of the permuted tokens.
  """
  return _positions(seq_len, n, layout)


def permute_sequence(x, n: int, layout: Layout, axis: int = 1):
  """Natural order → layout order along `axis` (then shard that axis contiguously over n)."""
  if layout == "contiguous":
    return x
  perm = layout_positions(x.shape[axis], n, layout).reshape(-1)
  return jnp.take(x, jnp.asarray(perm), axis=axis)


def unpermute_sequence(x, n: int, layout: Layout, axis: int = 1):
  """Layout order → natural order along `axis` (inverse of `permute_sequence`)."""
  if layout == "contiguous":
    return x
  perm = layout_positions(x.shape[axis], n, layout).reshape(-1)
  return jnp.take(x, jnp.asarray(np.argsort(perm)), axis=axis)


# --- the static ring schedule -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Rule:
  """Element rule of one pass: which (query position p, key position j) pairs are visited."""

  causal: bool
  window_left: int | None
  window_right: int | None
  k_lo: int = 0  # keys below this position belong to the sink side channel


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one ring call (hashable: a custom_vjp nondiff argument)."""

  axis: str
  n: int
  t_local: int
  layout: str
  causal: bool
  window_left: int | None
  window_right: int | None
  q_offset: int
  sinks: int          # keys [0, sinks) go through the side channel (0: none)
  scale: float
  block_q: int
  block_k: int
  segments: bool

  @property
  def ring_rule(self) -> _Rule:
    return _Rule(self.causal, self.window_left, self.window_right, self.sinks)

  @property
  def sink_rule(self) -> _Rule:
    return _Rule(self.causal, None, None, 0)


def _local_positions(plan: _Plan, d, xp=np):
  """Positions [T/n] device d holds, in local order (d an int, or traced with xp=jnp)."""
  n, tl = plan.n, plan.t_local
  i = xp.arange(tl)
  if plan.layout == "contiguous":
    return d * tl + i
  if plan.layout == "striped":
    return d + n * i
  c = tl // 2  # zigzag: chunks d and 2n-1-d
  return xp.where(i < c, d * c + i, (2 * n - 1 - d) * c + (i - c))


def _owner(plan: _Plan, p, xp=np):
  """(device, local index) holding position p (inverse of `_local_positions`)."""
  n, tl = plan.n, plan.t_local
  if plan.layout == "contiguous":
    return p // tl, p % tl
  if plan.layout == "striped":
    return p % n, p // n
  c = tl // 2
  chunk = p // c
  first = chunk < n
  return xp.where(first, chunk, 2 * n - 1 - chunk), p % c + xp.where(first, 0, c)


def _bounds(pos, b: int):
  """(min, max) position of each run of b local tokens. Positions rise within a chunk and no
  run straddles two chunks (tiles divide chunks), so they are the run's ends."""
  runs = pos.reshape(-1, b)
  return runs[:, 0], runs[:, -1]


def _classify(rule: _Rule, q_lo, q_hi, k_lo, k_hi, segments: bool, xp=np):
  """int32 [nq, nk] tile classes from position ranges (conservative: PARTIAL when unsure).

  Exact for contiguous runs of positions (contiguous and zigzag layouts); for striped runs a
  tile may be called PARTIAL although no pair in it is visited (it is then masked, not wrong).
  Runs in numpy for the static schedule and in jnp inside the kernel, the same code.
  """
  d_min = q_lo[:, None] - k_hi[None, :]
  d_max = q_hi[:, None] - k_lo[None, :]
  empty = xp.zeros(d_min.shape, bool)
  full = xp.ones(d_min.shape, bool)
  if rule.causal:
    empty = empty | (d_max < 0)
    full = full & (d_min >= 0)
  if rule.window_left is not None:
    empty = empty | (d_min > rule.window_left)
    full = full & (d_max <= rule.window_left)
  if rule.window_right is not None:
    empty = empty | (-d_max > rule.window_right)
    full = full & (-d_min <= rule.window_right)
  if rule.k_lo:
    empty = empty | (k_hi[None, :] < rule.k_lo)
    full = full & (k_lo[None, :] >= rule.k_lo)
  if segments:
    full = full & False
  return xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int32)


def _rows(classes, xp=np):
  """Per row: inner tile indices, FULL first then PARTIAL (each ascending), and int32
  (number FULL, number visited); the loops run exactly over the first `visited` entries."""
  key = xp.where(classes == FULL, 0, xp.where(classes == PARTIAL, 1, 2))
  order = (np.argsort(key, axis=-1, kind="stable") if xp is np else
           jnp.argsort(key, axis=-1, stable=True)).astype(xp.int32)
  n_full = (classes == FULL).sum(-1)
  n_tot = n_full + (classes == PARTIAL).sum(-1)
  return order, xp.stack([n_full, n_tot], -1).astype(xp.int32)


def _hop_classes(plan: _Plan, rule: _Rule, qpos, kpos, bq: int, bk: int, xp=np):
  q_lo, q_hi = _bounds(qpos + plan.q_offset, bq)
  k_lo, k_hi = _bounds(kpos, bk)
  return _classify(rule, q_lo, q_hi, k_lo, k_hi, plan.segments, xp)


@functools.lru_cache(maxsize=256)
def _hops(plan: _Plan) -> tuple[int, ...]:
  """The hops some device needs: chunk-level ranges, O(n^2) numpy at trace time."""
  chunk = plan.t_local // 2 if plan.layout == "zigzag" else plan.t_local
  pos = [_local_positions(plan, d) for d in range(plan.n)]
  return tuple(h for h in range(plan.n) if h == 0 or any(
      (_hop_classes(plan, plan.ring_rule, pos[d], pos[(d - h) % plan.n], chunk, chunk)
       != EMPTY).any() for d in range(plan.n)))


@dataclasses.dataclass(frozen=True)
class RingSchedule:
  """What `ring_attention` visits (static numpy, for tests and reports; see `ring_schedule`).

  The kernel computes the same classification per device and hop at run time from the same
  functions, so these counts are the trip counts of its loops.

  Attributes:
    positions: int [n, T/n], the positions each device holds.
    hops: the ring hops walked (0 = own block); hops no device needs are left out.
    counts: int32 [n, n_hops, n_q_tiles, 2]: per query tile, (FULL key tiles, visited key
      tiles) of the forward pass.
  """

  positions: np.ndarray
  hops: tuple[int, ...]
  counts: np.ndarray

  def visited_tiles(self) -> np.ndarray:
    """int [n]: key tiles each device visits over the whole ring (its work, in tiles)."""
    return self.counts[..., 1].sum(axis=(1, 2))

  def visited_tiles_per_hop(self) -> np.ndarray:
    """int [n, n_hops]."""
    return self.counts[..., 1].sum(axis=2)


def _largest_divisor(n: int, at_most: int) -> int:
  for b in range(min(n, at_most), 0, -1):
    if n % b == 0:
      return b
  return 1


def _block_bounds(block_sizes: BlockSizes | None, batch_heads: int) -> tuple[int, int]:
  if block_sizes is None:
    b = DEFAULT_BLOCK
    while b > 16 and batch_heads * b * b > TILE_ELEMENTS:
      b //= 2
    return b, b
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {block_sizes!r}")
  return block_sizes.block_q, block_sizes.block_k


def _make_plan(q, k, *, axis_name: str, axis_size: int, layout: str, mask: Mask,
               q_seg, scale: float | None, block_q: int, block_k: int) -> _Plan:
  b, tl, h, dk = q.shape
  if k.shape[1] != tl:
    raise ValueError(f"ring_attention: local query ({tl}) and key ({k.shape[1]}) lengths differ; "
                     f"self-attention over one sharded sequence is required")
  if not isinstance(mask, Mask):
    raise ValueError(f"ring_attention: mask must be a memx Mask, got {type(mask).__name__}")
  if mask.num_heads is not None:
    raise NotImplementedError("ring_attention: per-head masks are not supported; use "
                              "method='all_to_all' with a head-uniform mask or no SP")
  if mask.block_sparse is not None:
    raise NotImplementedError("ring_attention: block-sparse layouts are not supported; use "
                              "method='all_to_all'")
  t = tl * axis_size
  _check_layout(t, axis_size, layout)
  mask.check_fits(t, t, h)
  chunk = tl // 2 if layout == "zigzag" else tl
  # Tiles divide a chunk, so no tile straddles the two halves of a zigzag shard.
  bq, bk = _largest_divisor(chunk, block_q), _largest_divisor(chunk, block_k)
  windowed = mask.window_left is not None or mask.window_right is not None
  return _Plan(axis=axis_name, n=axis_size, t_local=tl, layout=layout, causal=mask.causal,
               window_left=mask.window_left, window_right=mask.window_right,
               q_offset=mask.q_offset, sinks=mask.n_sink if windowed else 0,
               scale=dk ** -0.5 if scale is None else float(scale), block_q=bq, block_k=bk,
               segments=q_seg is not None)


def ring_schedule(seq_len: int, n: int, *, layout: Layout = "contiguous", mask: Mask = CAUSAL,
                  block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
                  segments: bool = False) -> RingSchedule:
  """What `ring_attention` visits for a sequence of seq_len over n devices.

  block_q / block_k bound the tiles (the largest divisors of a chunk not above them), as
  `BlockSizes.block_q / block_k` do. O(n^2 tiles^2) numpy: for tests and reports.
  """
  q = jax.ShapeDtypeStruct((1, seq_len // n, 1, 8), jnp.float32)
  plan = _make_plan(q, q, axis_name="seq", axis_size=n, layout=layout, mask=mask,
                    q_seg=True if segments else None, scale=1.0, block_q=block_q,
                    block_k=block_k)
  hops = _hops(plan)
  pos = np.stack([_local_positions(plan, d) for d in range(n)])
  counts = np.stack([np.stack([_rows(_hop_classes(plan, plan.ring_rule, pos[d],
                                                  pos[(d - h) % n], plan.block_q,
                                                  plan.block_k))[1] for h in hops])
                     for d in range(n)])
  return RingSchedule(positions=pos, hops=hops, counts=counts)


# --- blockwise passes (one hop) -----------------------------------------------------------------
# Layouts (natural, so no tile-major copies): q, do [B, T, G, R, K]; m, l, lse, delta fp32
# [B, G, R, T]; acc, dq fp32 [B, T, G, R, K]; k, v, dk, dv [B, S, G, K]. Every accumulator is a
# loop carry updated tile by tile in place (dynamic_update_slice), so each exists once.

def _slice(x, start, size, axis):
  return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _add_slice(x, update, start, axis):
  return lax.dynamic_update_slice_in_dim(x, _slice(x, start, update.shape[axis], axis) + update,
                                         start, axis=axis)


def _visible(rule: _Rule, qp, kp, qs, ks):
  """bool [B or 1, 1, 1, bq, bk] for positions qp [bq], kp [bk], segment ids [B, bq/bk]."""
  d = qp[:, None] - kp[None, :]
  ok = jnp.ones(d.shape, bool)
  if rule.causal:
    ok &= d >= 0
  if rule.window_left is not None:
    ok &= d <= rule.window_left
  if rule.window_right is not None:
    ok &= -d <= rule.window_right
  if rule.k_lo:
    ok &= (kp >= rule.k_lo)[None, :]
  ok = ok[None, None, None]
  if qs is not None:
    ok = ok & (qs[:, :, None] == ks[:, None, :])[:, None, None]
  return ok


def _fwd_pass(rule: _Rule, c: float, q, qpos, q_seg, k, v, kp, ks, state, table, counts,
              bq: int, bk: int):
  """One hop of the forward: every query tile against the key tiles its row lists.

  k, v: the block held at this hop; kp [S] its positions; ks [B, S] or None its segment ids.
  state = (m, l, acc): running base-2 max, denominator and unnormalised output (fp32).
  table [nq, M], counts [nq, 2]: this device's schedule row for this hop (traced values).
  """

  def row(i, state):
    m_all, l_all, acc_all = state
    q0 = i * bq
    q_blk, qp = _slice(q, q0, bq, 1), _slice(qpos, q0, bq, 0)
    qs = None if q_seg is None else _slice(q_seg, q0, bq, 1)
    tab, cnt = table[i], counts[i]

    def body(j, carry, elementwise):
      m_prev, l_prev, acc_prev = carry
      k0 = tab[j] * bk
      k_blk, v_blk = _slice(k, k0, bk, 1), _slice(v, k0, bk, 1)
      s = jnp.einsum("bqgrd,bkgd->bgrqk", q_blk, k_blk, preferred_element_type=jnp.float32) * c
      if elementwise:
        ks_blk = None if ks is None else _slice(ks, k0, bk, 1)
        # -inf (not MASK_VALUE): exp2 gives exact zeros even while m is still MASK_VALUE.
        s = jnp.where(_visible(rule, qp, _slice(kp, k0, bk, 0), qs, ks_blk), s, -jnp.inf)
      # Online softmax (FA2 Alg. 1): rescale what we have by exp2(m_prev - m_new).
      m_new = jnp.maximum(m_prev, s.max(-1))
      corr = jnp.exp2(m_prev - m_new)
      p = jnp.exp2(s - m_new[..., None])
      pv = jnp.einsum("bgrqk,bkgd->bqgrd", p.astype(v.dtype), v_blk,
                      preferred_element_type=jnp.float32)
      acc_new = acc_prev * jnp.moveaxis(corr, 3, 1)[..., None] + pv
      return m_new, l_prev * corr + p.sum(-1), acc_new

    carry = (_slice(m_all, q0, bq, 3), _slice(l_all, q0, bq, 3), _slice(acc_all, q0, bq, 1))
    carry = lax.fori_loop(0, cnt[0], functools.partial(body, elementwise=False), carry)
    m, den, acc = lax.fori_loop(cnt[0], cnt[1], functools.partial(body, elementwise=True), carry)
    return (lax.dynamic_update_slice_in_dim(m_all, m, q0, axis=3),
            lax.dynamic_update_slice_in_dim(l_all, den, q0, axis=3),
            lax.dynamic_update_slice_in_dim(acc_all, acc, q0, axis=1))

  return lax.fori_loop(0, table.shape[0], row, state)


def _bwd_pass(rule: _Rule, c: float, q, do, lse, delta, qpos, q_seg, k, v, kp, ks, grads,
              table, counts, bq: int, bk: int):
  """One hop of the backward (FA2 Alg. 2): key tiles outer, the query tiles listed inner.

  grads = (dq, dk, dv), fp32, unscaled: dq of this device's queries, dk/dv of the block held
  at this hop (they travel with it). Returns them with this hop's contributions added.
  """

  def col(j, grads):
    k0 = j * bk
    k_blk, v_blk, kp_blk = _slice(k, k0, bk, 1), _slice(v, k0, bk, 1), _slice(kp, k0, bk, 0)
    ks_blk = None if ks is None else _slice(ks, k0, bk, 1)
    tab, cnt = table[j], counts[j]

    def body(i, carry, elementwise):
      dk_acc, dv_acc, dq = carry
      q0 = tab[i] * bq
      q_blk, do_blk = _slice(q, q0, bq, 1), _slice(do, q0, bq, 1)
      lse_blk, delta_blk = _slice(lse, q0, bq, 3), _slice(delta, q0, bq, 3)
      s = jnp.einsum("bqgrd,bkgd->bgrqk", q_blk, k_blk, preferred_element_type=jnp.float32) * c
      if elementwise:
        qs = None if q_seg is None else _slice(q_seg, q0, bq, 1)
        s = jnp.where(_visible(rule, _slice(qpos, q0, bq, 0), kp_blk, qs, ks_blk), s, -jnp.inf)
      p = jnp.exp2(s - lse_blk[..., None])                          # [B, G, R, bq, bk]
      dv_acc = dv_acc + jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(do_blk.dtype), do_blk,
                                   preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqgrd,bkgd->bgrqk", do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_blk[..., None])).astype(q_blk.dtype)    # dL/d(scaled logits)
      dk_acc = dk_acc + jnp.einsum("bgrqk,bqgrd->bkgd", ds, q_blk,
                                   preferred_element_type=jnp.float32)
      dq_blk = jnp.einsum("bgrqk,bkgd->bqgrd", ds, k_blk, preferred_element_type=jnp.float32)
      return dk_acc, dv_acc, _add_slice(dq, dq_blk, q0, 1)

    dq, dk, dv = grads
    carry = (jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32), dq)
    carry = lax.fori_loop(0, cnt[0], functools.partial(body, elementwise=False), carry)
    dk_acc, dv_acc, dq = lax.fori_loop(cnt[0], cnt[1], functools.partial(body, elementwise=True),
                                       carry)
    return dq, _add_slice(dk, dk_acc, k0, 1), _add_slice(dv, dv_acc, k0, 1)

  return lax.fori_loop(0, table.shape[0], col, grads)


# --- the ring -----------------------------------------------------------------------------------

def _shift(tree, plan: _Plan, s: int):
  """Every device sends to device + s (mod n): afterwards device d holds what d - s had."""
  s %= plan.n
  if s == 0:
    return tree
  perm = [(j, (j + s) % plan.n) for j in range(plan.n)]
  return jax.tree.map(lambda x: lax.ppermute(x, plan.axis, perm), tree)


def _one_step_ring(hops: tuple[int, ...]) -> bool:
  """Hops 0, 1, ..., h: a lax.scan of one-step shifts (else an unrolled walk)."""
  return hops == tuple(range(len(hops))) and len(hops) > 1


def _sink_owner(plan: _Plan, me):
  """For sink positions 0..n_sink-1: held by this device?, and at which local index."""
  device, local = _owner(plan, jnp.arange(plan.sinks), jnp)
  return device == me, local


def _gather_sinks(plan: _Plan, me, k, v, kv_seg):
  """The first `plan.sinks` keys, values (and segment ids) on every device: one tiny psum."""
  mine, idx = _sink_owner(plan, me)

  def pick(x):
    sel = jnp.take(x, idx, axis=1)
    keep = mine.reshape((1, -1) + (1,) * (x.ndim - 2))
    return lax.psum(jnp.where(keep, sel, jnp.zeros_like(sel)), plan.axis)

  return pick(k), pick(v), None if kv_seg is None else pick(kv_seg)


def _walk(plan: _Plan, hops: tuple[int, ...], hop, moving, fixed):
  """Runs hop(i, moving, fixed) -> (moving, fixed) at every hop, shifting `moving` between.

  `moving` travels the ring (K/V, and dK/dV in the backward); `fixed` stays (accumulators of
  this device's queries). Returns both after the last hop, `moving` not shifted home.
  """
  if _one_step_ring(hops):
    def step(carry, i):
      moving, fixed = carry
      moving, fixed = hop(i, moving, fixed)
      return (_shift(moving, plan, 1), fixed), None

    (moving, fixed), _ = lax.scan(step, (moving, fixed), jnp.arange(len(hops) - 1))
    return hop(len(hops) - 1, moving, fixed)
  for i in range(len(hops)):
    if i:
      moving = _shift(moving, plan, hops[i] - hops[i - 1])
    moving, fixed = hop(i, moving, fixed)
  return moving, fixed


def _tables(plan: _Plan, rule: _Rule, qpos, kpos, bk: int, transpose: bool):
  """This device's tile lists for one pass (run time: device and hop are traced values)."""
  classes = _hop_classes(plan, rule, qpos, kpos, plan.block_q, bk, jnp)
  return _rows(classes.T if transpose else classes, jnp)


def _ring_forward(plan: _Plan, q, k, v, q_seg, kv_seg):
  me = lax.axis_index(plan.axis)
  hops = _hops(plan)
  b, tl, h, dk = q.shape
  g, dv = k.shape[2], v.shape[-1]
  r = h // g
  bq, bk = plan.block_q, plan.block_k
  c = plan.scale * LOG2E
  pos = _local_positions(plan, me, jnp)
  qpos = pos + plan.q_offset
  q5 = q.reshape(b, tl, g, r, dk)
  # m starts at a finite MASK_VALUE so exp2(m_prev - m_new) is never exp2(-inf + inf).
  state = (jnp.full((b, g, r, tl), MASK_VALUE, jnp.float32),
           jnp.zeros((b, g, r, tl), jnp.float32), jnp.zeros((b, tl, g, r, dv), jnp.float32))
  sinks = None
  if plan.sinks:
    sinks = _gather_sinks(plan, me, k, v, kv_seg)
    spos = jnp.arange(plan.sinks)
    table, counts = _tables(plan, plan.sink_rule, pos, spos, plan.sinks, transpose=False)
    state = _fwd_pass(plan.sink_rule, c, q5, qpos, q_seg, sinks[0], sinks[1], spos, sinks[2],
                      state, table, counts, bq, plan.sinks)
  hop_of = jnp.asarray(hops, jnp.int32)

  def hop(i, kv, state):
    kpos = _local_positions(plan, (me - hop_of[i]) % plan.n, jnp)
    table, counts = _tables(plan, plan.ring_rule, pos, kpos, bk, transpose=False)
    state = _fwd_pass(plan.ring_rule, c, q5, qpos, q_seg, kv[0], kv[1], kpos, kv[2], state,
                      table, counts, bq, bk)
    return kv, state

  _, (m, den, acc) = _walk(plan, hops, hop, (k, v, kv_seg), state)
  o = acc / jnp.moveaxis(jnp.where(den == 0.0, 1.0, den), 3, 1)[..., None]
  lse = jnp.where(den > 0.0, m + jnp.log2(jnp.where(den > 0.0, den, 1.0)), LSE_EMPTY)
  return o.reshape(b, tl, h, dv).astype(q.dtype), lse, sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan: _Plan, q, k, v, q_seg, kv_seg):
  return _ring_forward(plan, q, k, v, q_seg, kv_seg)[0]


def _ring_fwd(plan, q, k, v, q_seg, kv_seg):
  o, lse, sinks = _ring_forward(plan, q, k, v, q_seg, kv_seg)
  o, lse = checkpoint_name(o, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)
  # Residuals: inputs, O and the LSE only; no [T, S] tensor and no remote K/V survive.
  return o, (q, k, v, q_seg, kv_seg, o, lse, sinks)


def _ring_bwd(plan, res, do):
  q, k, v, q_seg, kv_seg, o, lse, sinks = res
  me = lax.axis_index(plan.axis)
  hops = _hops(plan)
  b, tl, h, dk = q.shape
  g, dv = k.shape[2], v.shape[-1]
  r = h // g
  bq, bk = plan.block_q, plan.block_k
  c = plan.scale * LOG2E
  pos = _local_positions(plan, me, jnp)
  qpos = pos + plan.q_offset
  q5, do5 = q.reshape(b, tl, g, r, dk), do.reshape(b, tl, g, r, dv)
  # delta_i = rowsum(dO_i * O_i) (FA2 Alg. 2 line 4), fp32 [B, G, R, T].
  delta = jnp.einsum("bqgrd,bqgrd->bgrq", do5.astype(jnp.float32),
                     o.reshape(b, tl, g, r, dv).astype(jnp.float32))
  dq = jnp.zeros(q5.shape, jnp.float32)
  sink_grads = None
  if plan.sinks:
    spos = jnp.arange(plan.sinks)
    table, counts = _tables(plan, plan.sink_rule, pos, spos, plan.sinks, transpose=True)
    zeros = (jnp.zeros(sinks[0].shape, jnp.float32), jnp.zeros(sinks[1].shape, jnp.float32))
    dq, dks, dvs = _bwd_pass(plan.sink_rule, c, q5, do5, lse, delta, qpos, q_seg, sinks[0],
                             sinks[1], spos, sinks[2], (dq, *zeros), table, counts, bq,
                             plan.sinks)
    sink_grads = lax.psum((dks, dvs), plan.axis)
  hop_of = jnp.asarray(hops, jnp.int32)

  def hop(i, moving, dq):
    (k_, v_, ks_), (dk_, dv_) = moving
    kpos = _local_positions(plan, (me - hop_of[i]) % plan.n, jnp)
    table, counts = _tables(plan, plan.ring_rule, pos, kpos, bk, transpose=True)
    dq, dk_, dv_ = _bwd_pass(plan.ring_rule, c, q5, do5, lse, delta, qpos, q_seg, k_, v_, kpos,
                             ks_, (dq, dk_, dv_), table, counts, bq, bk)
    return ((k_, v_, ks_), (dk_, dv_)), dq

  # dK/dV of a block travel with it (fp32: they are sums over every device's queries).
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (_, dkv), dq = _walk(plan, hops, hop, ((k, v, kv_seg), dkv), dq)
  dk_f, dv_f = _shift(dkv, plan, -hops[-1])  # home: the block that left d returns to d
  if sink_grads is not None:
    mine, idx = _sink_owner(plan, me)
    keep = mine[None, :, None, None]
    dk_f = dk_f.at[:, idx].add(jnp.where(keep, sink_grads[0], 0.0))
    dv_f = dv_f.at[:, idx].add(jnp.where(keep, sink_grads[1], 0.0))
  dq = (dq * plan.scale).reshape(b, tl, h, dk)
  return (dq.astype(q.dtype), (dk_f * plan.scale).astype(k.dtype), dv_f.astype(v.dtype),
          None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _local_segments(segment_ids, q, k):
  q_seg, kv_seg = split_segment_ids(segment_ids)
  if q_seg is None:
    return None, None
  for name, x, want in (("q", q_seg, q.shape[:2]), ("kv", kv_seg, k.shape[:2])):
    if tuple(x.shape) != tuple(want):
      raise ValueError(f"{name} segment ids must have the local shape {tuple(want)}, got "
                       f"{x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"segment ids must be integers, got {x.dtype}")
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check_qkv(q, k, v, who: str) -> None:
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"{who}: q must be [B, T, H, K] and k, v [B, T, G, K] (same shape); got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3] or q.shape[0] != k.shape[0]:
    raise ValueError(f"{who}: q {q.shape} and k {k.shape} do not match (heads must be a "
                     f"multiple of kv heads; batch and head dim equal)")


def ring_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T G K"],
    *,
    axis_name: str,
    axis_size: int,
    layout: Layout = "contiguous",
    mask: Mask = CAUSAL,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H K"]:
  """Ring attention on this device's shard; call inside shard_map over `axis_name`.

  Args:
    q, k, v: the local shards [B, T/n, H|G, K] of a sequence of T = n·(T/n) tokens laid out
      by `layout` over the n = axis_size devices of `axis_name`.
    layout: which positions each device holds ("contiguous", "zigzag", "striped").
    mask: causal / window / sinks / q_offset (positions are global); head-uniform only.
    segment_ids: local [B, T/n] ids (or a (q, kv) pair of them); pairs attend within a segment.
    scale: logit scale; default K ** -0.5.
    block_sizes: block_q / block_k bound the tiles; each tile divides a chunk (default 512,
      halved while the fp32 scores of a tile, B·H·bq·bk, exceed TILE_ELEMENTS).

  Returns:
    The local output [B, T/n, H, K] in q.dtype; scores, softmax statistics, accumulators and
    the dK/dV passed around in the backward are fp32.
  """
  _check_qkv(q, k, v, "ring_attention")
  q_seg, kv_seg = _local_segments(segment_ids, q, k)
  bq, bk = _block_bounds(block_sizes, q.shape[0] * q.shape[2])
  plan = _make_plan(q, k, axis_name=axis_name, axis_size=axis_size, layout=layout, mask=mask,
                    q_seg=q_seg, scale=scale, block_q=bq, block_k=bk)
  return _ring(plan, q, k, v, q_seg, kv_seg)


def all_to_all_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T G K"],
    *,
    axis_name: str,
    axis_size: int,
    layout: Layout = "contiguous",
    mask: Mask = CAUSAL,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    implementation=None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H K"]:
  """Ulysses attention on this device's shard; call inside shard_map over `axis_name`.

  One all-to-all turns q, k, v [B, T/n, H, K] into [B, T, H/n, K] (the whole sequence, a slice
  of the heads), the memx kernel (`implementation`) runs on it, and one all-to-all turns the
  output back. Heads must divide by n. With fewer kv heads than devices (GQA, G < n, n % G ==
  0), each kv head is repeated n/G times so every device gets the one its query heads read;
  no more. Segment ids (int32, tiny) are all-gathered; K/V never are.
  """
  _check_qkv(q, k, v, "all_to_all_attention")
  n = axis_size
  h, g = q.shape[2], k.shape[2]
  if h % n:
    raise ValueError(f"all_to_all_attention: {h} query heads do not split over {n} devices of "
                     f"{axis_name!r}; use method='ring'")
  if g % n:
    if n % g:
      raise ValueError(f"all_to_all_attention: {g} kv heads and {n} devices: one must divide "
                       f"the other; use method='ring'")
    k, v = jnp.repeat(k, n // g, axis=2), jnp.repeat(v, n // g, axis=2)
  if mask.num_heads is not None:
    raise NotImplementedError("all_to_all_attention: per-head masks are not supported (each "
                              "device runs a different slice of the heads)")
  q_seg, kv_seg = _local_segments(segment_ids, q, k)
  t = q.shape[1] * n
  _check_layout(t, n, layout)

  def to_heads(x):
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

  qf, kf, vf = to_heads(q), to_heads(k), to_heads(v)
  seg = None
  if q_seg is not None:
    seg = tuple(lax.all_gather(s, axis_name, axis=1, tiled=True) for s in (q_seg, kv_seg))
  if layout != "contiguous":  # the kernel's mask speaks natural order
    qf, kf, vf = (unpermute_sequence(x, n, layout) for x in (qf, kf, vf))
    seg = None if seg is None else tuple(unpermute_sequence(s, n, layout) for s in seg)
  o = attention(qf, kf, vf, mask=mask, segment_ids=seg, scale=scale,
                implementation=implementation, block_sizes=block_sizes)
  o = permute_sequence(o, n, layout)
  return lax.all_to_all(o, axis_name, split_axis=1, concat_axis=2, tiled=True)


# --- global entry points ------------------------------------------------------------------------

_FROM_RULES = object()


def _axes_from_rules(name: str, mesh, exclude: str):
  spec = logical_to_spec((name,), active_rules(), dict(mesh.shape))
  axes = tuple(a for a in mesh_axes_of(spec[0]) if a != exclude)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def sequence_parallel_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T G K"],
    *,
    mesh=None,
    axis: str = "seq",
    method: Method = "ring",
    layout: Layout = "contiguous",
    mask: Mask = CAUSAL,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    implementation=None,
    batch_axes=_FROM_RULES,
    head_axes=_FROM_RULES,
) -> Float[Array, "B T H K"]:
  """Attention over a sequence split along mesh axis `axis`, on global arrays.

  Args:
    q, k, v: global [B, T, H|G, K], T in `layout` order (see `permute_sequence`).
    mesh: a Mesh or AbstractMesh; default the one set by `jax.set_mesh`.
    axis: the mesh axis the sequence is split over.
    method: "ring" (`ring_attention`) or "all_to_all" (`all_to_all_attention`).
    layout, mask, segment_ids, scale, block_sizes: as `ring_attention`; segment ids are global.
    implementation: the kernel all_to_all runs (memx.kernels.attention); the ring's per-hop
      compute is its own blockwise XLA math.
    batch_axes, head_axes: mesh axes B and H (and G) are split over; default from the active
      rules (BATCH, HEADS / KV_HEADS), so shard_map matches the surrounding sharding.

  Returns:
    [B, T, H, K] in q.dtype, sharded like q. With `axis` of size 1 this is the kernel itself.
  """
  if method not in METHODS:
    raise ValueError(f"sequence_parallel_attention: method {method!r} is not one of {METHODS}")
  mesh = active_mesh() if mesh is None else mesh
  if mesh is None:
    raise ValueError("sequence_parallel_attention: no mesh; pass mesh= or enter jax.set_mesh")
  if axis not in mesh.shape:
    raise ValueError(f"sequence_parallel_attention: mesh axes {tuple(mesh.shape)} lack {axis!r}")
  n = mesh.shape[axis]
  if n == 1:
    return attention(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale,
                     implementation=implementation, block_sizes=block_sizes)
  _check_qkv(q, k, v, "sequence_parallel_attention")
  _check_layout(q.shape[1], n, layout)
  if batch_axes is _FROM_RULES:
    batch_axes = _axes_from_rules(BATCH, mesh, axis)
  kv_axes = head_axes
  if head_axes is _FROM_RULES:
    head_axes = _axes_from_rules(HEADS, mesh, axis)
    kv_axes = _axes_from_rules(KV_HEADS, mesh, axis)
  if kv_axes != head_axes:
    raise ValueError(f"sequence_parallel_attention: query heads split over {head_axes} but kv "
                     f"heads over {kv_axes}; GQA needs both split the same way")
  qspec = PartitionSpec(batch_axes, axis, head_axes, None)
  seg_spec = PartitionSpec(batch_axes, axis)
  if segment_ids is None:
    seg_specs = None
  elif isinstance(segment_ids, tuple | list):
    segment_ids = tuple(segment_ids)
    seg_specs = (seg_spec, seg_spec)
  else:
    seg_specs = seg_spec

  def local(q, k, v, seg):
    if method == "ring":
      return ring_attention(q, k, v, axis_name=axis, axis_size=n, layout=layout, mask=mask,
                            segment_ids=seg, scale=scale, block_sizes=block_sizes)
    return all_to_all_attention(q, k, v, axis_name=axis, axis_size=n, layout=layout, mask=mask,
                                segment_ids=seg, scale=scale, implementation=implementation,
                                block_sizes=block_sizes)

  # check_vma=False: the ring's custom VJP does its own collectives (ppermute / psum), so the
  # replication checker has nothing to verify and would reject its loop carries.
  fn = jax.shard_map(local, mesh=mesh, in_specs=(qspec, qspec, qspec, seg_specs),
                     out_specs=qspec, check_vma=False)
  return fn(q, k, v, segment_ids)


def _active_seq_axis() -> tuple[str, int] | None:
  """(mesh axis, size) the active rules split SEQ over, or None (no mesh, rules or split)."""
  mesh, rules = active_mesh(), active_rules()
  if mesh is None or not rules:
    return None
  spec = logical_to_spec((SEQ,), rules, dict(mesh.shape))
  axes = tuple(a for a in mesh_axes_of(spec[0]) if mesh.shape[a] > 1)
  if not axes:
    return None
  if len(axes) > 1:
    raise NotImplementedError(f"sequence parallelism over several mesh axes {axes}")
  return axes[0], mesh.shape[axes[0]]


def batch_to_layout(batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
  """The batch in the token order sequence-parallel attention expects, and its positions.

  Under a sharding context whose rules split SEQ over n devices with the zigzag or striped
  layout, every [B, T, ...] array of `batch` is reordered (`permute_sequence`) and positions
  [B, T] are the reordered 0..T-1 (for RoPE); otherwise the batch is returned as it is with
  positions 0..T-1. A batch with its own "positions" (document masks restart them) gives
  those, reordered alike. Token-wise losses (sum or mean over tokens) do not change.
  """
  shape = batch["inputs"].shape[:2] if "inputs" in batch else next(iter(batch.values())).shape[:2]
  positions = batch.get("positions")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  seq = _active_seq_axis()
  layout = sequence_options().layout
  if seq is None or layout == "contiguous":  # (every method reads tokens in the layout's order)
    return batch, positions
  n = seq[1]
  out = {k: permute_sequence(x, n, layout) if x.shape[:2] == shape else x
         for k, x in batch.items()}
  return out, permute_sequence(positions, n, layout)


def sharded_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T G K"],
    *,
    mask: Mask = CAUSAL,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    implementation=None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H K"]:
  """The attention call for layers: sequence parallel when the active rules split SEQ.

  Under `sharding_context(mesh, strategy, ...)` with a strategy that maps SEQ to a mesh axis
  of size > 1, runs `sequence_parallel_attention` with the context's method and layout;
  otherwise (one device, no mesh, no SP) it is exactly `memx.kernels.attention.attention`.
  """
  seq = _active_seq_axis()
  if seq is None:
    return attention(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale,
                     implementation=implementation, block_sizes=block_sizes)
  opts = sequence_options()
  return sequence_parallel_attention(
      q, k, v, mesh=active_mesh(), axis=seq[0], method=opts.method, layout=opts.layout, mask=mask,
      segment_ids=segment_ids, scale=scale, block_sizes=block_sizes,
      implementation=implementation)
