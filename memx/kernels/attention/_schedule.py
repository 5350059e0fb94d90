"""Block schedules shared by the blockwise implementations: which tiles to visit, and how to mask.

A schedule lists, for every tile row ("outer" block: a query block in the forward and dQ
passes, a key block in the dK/dV pass), the tiles of the other axis ("inner" blocks) that hold
at least one visited pair. FULL tiles come first, then PARTIAL ones, so a kernel runs two
loops: one without element masking and one with it. EMPTY tiles never appear: they are skipped,
not computed and discarded. Schedules come from `Mask.block_layout` (static, numpy, built once
per trace); segment ids refine them at run time (`segment_schedule`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from memx.kernels.attention.mask import EMPTY, FULL, PARTIAL, Mask

# "Unbounded window" inside kernels: int32-safe and larger than any position difference.
UNBOUNDED = 1 << 30


@dataclasses.dataclass(frozen=True)
class Rule:
  """Static shape of the element rule for PARTIAL tiles (which terms exist at all).

  The per-head numbers (windows, sinks) are passed separately: python ints for a head-uniform
  mask (folded into the kernel), traced int32 scalars for per-head masks.
  """

  causal: bool
  window_left: bool
  window_right: bool
  sink: bool
  q_offset: int
  s_len: int          # real number of keys; key columns >= s_len are padding
  mask_padding: bool  # whether any key tile sticks out past s_len
  # The query offset is an int32 the kernel reads at run time (chunked prefill inside a scan:
  # one compiled program for every chunk); q_offset is then 0 and schedules come from
  # `dynamic_schedule`.
  dynamic_offset: bool = False


def rule_for(masks: tuple[Mask, ...], s_len: int, s_padded: int) -> Rule:
  m0 = masks[0]
  return Rule(
      causal=m0.causal,
      window_left=any(m.window_left is not None for m in masks),
      window_right=any(m.window_right is not None for m in masks),
      sink=any(m.n_sink > 0 for m in masks),
      q_offset=m0.q_offset, s_len=s_len, mask_padding=s_padded != s_len)


def head_params(masks: tuple[Mask, ...]) -> np.ndarray:
  """int32 [H, 4]: (window_left, window_right, n_sink, 0) per head; None windows -> UNBOUNDED."""
  w = lambda x: UNBOUNDED if x is None else x
  return np.array([[w(m.window_left), w(m.window_right), m.n_sink, 0] for m in masks], np.int32)


def uniform_params(m: Mask) -> tuple[int, int, int]:
  w = lambda x: UNBOUNDED if x is None else x
  return w(m.window_left), w(m.window_right), m.n_sink


def visible(rule: Rule, q_pos, k_pos, window_left, window_right, n_sink, *,
            transpose: bool = False):
  """Element rule of `Mask` on one tile: bool [bq, bk] from positions q_pos [bq], k_pos [bk].

  q_pos are absolute query positions (q_offset already added), k_pos key indices. With
  transpose=True the tile is laid out [bk, bq] (the dK/dV pass works on transposed scores).
  Written with 2-D broadcasts only, so the same code runs inside Triton kernels and in XLA.
  """
  if transpose:
    qp, kp = q_pos[None, :], k_pos[:, None]
    shape = (k_pos.shape[0], q_pos.shape[0])
  else:
    qp, kp = q_pos[:, None], k_pos[None, :]
    shape = (q_pos.shape[0], k_pos.shape[0])
  ok = None

  def conj(a, b):
    return b if a is None else a & b

  if rule.causal:
    ok = conj(ok, kp <= qp)
  band = None
  if rule.window_left:
    band = conj(band, qp - kp <= window_left)
  if rule.window_right:
    band = conj(band, kp - qp <= window_right)
  if rule.sink and band is not None:
    band = band | (kp < n_sink)
  if band is not None:
    ok = conj(ok, band)
  if rule.mask_padding:
    ok = conj(ok, kp < rule.s_len)
  if ok is None:
    ok = kp >= 0
  return jnp.broadcast_to(ok, shape)


def dedupe_heads(masks: tuple[Mask, ...]) -> tuple[Mask, ...]:
  """One mask when every head sees the same one (schedules then carry a head axis of 1)."""
  return masks[:1] if all(m == masks[0] for m in masks) else masks


@functools.lru_cache(maxsize=128)
def schedule(masks: tuple[Mask, ...], t: int, s: int, block_q: int, block_k: int,
             transpose: bool, t_pad: int, s_pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Static tile schedule for inputs padded to [t_pad, s_pad] (padding tiles are EMPTY).

  Returns:
    table: int32 [H', n_outer, M]: inner block indices per outer block, FULL tiles first then
      PARTIAL ones, each group in ascending order; padding entries repeat a valid index.
    counts: int32 [H', n_outer, 2]: (number of FULL tiles, number of visited tiles).
    H' is len(masks) (1 for a head-uniform mask); M is the largest row length (at least 1).
  """
  classes = np.stack([m.block_layout(t, s, block_q, block_k)[0] for m in masks])
  n_q, n_k = t_pad // block_q, s_pad // block_k
  classes = np.pad(classes, ((0, 0), (0, n_q - classes.shape[1]), (0, n_k - classes.shape[2])),
                   constant_values=EMPTY)
  if transpose:
    classes = classes.transpose(0, 2, 1)
  # Sort key: FULL (0) before PARTIAL (1) before EMPTY (2); a stable sort keeps each group
  # in ascending block order, which walks memory forward.
  key = np.where(classes == FULL, 0, np.where(classes == PARTIAL, 1, 2))
  order = np.argsort(key, axis=-1, kind="stable").astype(np.int32)
  n_full = (classes == FULL).sum(-1)
  n_tot = n_full + (classes == PARTIAL).sum(-1)
  width = max(1, int(n_tot.max()))
  table = np.ascontiguousarray(order[..., :width])
  counts = np.stack([n_full, n_tot], -1).astype(np.int32)
  table.flags.writeable = False
  counts.flags.writeable = False
  return table, counts


def contiguous_prefix(table, counts):
  """int32 [..., n_outer] (numpy in, numpy out; else jnp): per row, how many of its first FULL
  tiles are the consecutive blocks table[0], table[0] + 1, ... A kernel walks those as
  first + j and reads one table entry per row, not one per step (a scalar load the next tile's
  address would wait on). All of a row's FULL tiles under causal and window masks; under
  segment ids, those of the row's own document; a FULL sink tile ends the run at 1."""
  xp = np if isinstance(table, np.ndarray) else jnp
  idx = xp.arange(table.shape[-1]).reshape((1,) * (table.ndim - 1) + (-1,))
  run = xp.cumprod(table == table[..., :1] + idx, axis=-1).sum(-1)
  return xp.minimum(run, counts[..., 0]).astype(xp.int32)


def with_prefix(table, counts):
  """counts [..., 2] -> [..., 3]: (FULL tiles, visited tiles, `contiguous_prefix`)."""
  xp = np if isinstance(table, np.ndarray) else jnp
  return xp.concatenate([counts, contiguous_prefix(table, counts)[..., None]], -1)


def dynamic_schedule(masks: tuple[Mask, ...], rule: Rule, offset, block_q: int, block_k: int,
                     t_pad: int, s_pad: int):
  """`schedule` (forward direction) for queries at a run-time offset, computed in XLA.

  Query block i holds positions offset + [i·bq, (i+1)·bq), key block j keys [j·bk, (j+1)·bk).
  Each term of the element rule is monotone in q and k, so a tile's corners decide it: a tile
  is FULL when every term holds on all of it, EMPTY when some term fails on all of it (or both
  window and sink fail on all of it), else PARTIAL. Both tests are sufficient conditions, so a
  tile is never FULL with a hidden pair nor EMPTY with a visible one; at worst a tile is
  masked element-wise that need not be. Same layout as `schedule`: int32 table [H', n_q, n_k]
  (FULL tiles first, then PARTIAL, ascending) and counts [H', n_q, 2].
  """
  n_q, n_k = t_pad // block_q, s_pad // block_k
  hp = jnp.asarray(head_params(masks))[:, :, None, None]        # [H', 4, 1, 1]
  left, right, sink = hp[:, 0], hp[:, 1], hp[:, 2]              # [H', 1, 1]
  q_lo = (offset + jnp.arange(n_q) * block_q)[None, :, None]    # [1, n_q, 1]
  q_hi = q_lo + block_q - 1
  k_lo = (jnp.arange(n_k) * block_k)[None, None, :]             # [1, 1, n_k]
  k_hi = k_lo + block_k - 1
  every, none = jnp.ones((), bool), jnp.zeros((), bool)
  if rule.causal:
    every, none = every & (k_hi <= q_lo), none | (k_lo > q_hi)
  band_all, band_none = jnp.ones((), bool), jnp.zeros((), bool)
  if rule.window_left:
    band_all, band_none = band_all & (q_hi - k_lo <= left), band_none | (q_lo - k_hi > left)
  if rule.window_right:
    band_all, band_none = band_all & (k_hi - q_lo <= right), band_none | (k_lo - q_hi > right)
  if rule.sink:
    band_all, band_none = band_all | (k_hi < sink), band_none & (k_lo >= sink)
  every, none = every & band_all, none | band_none
  every, none = every & (k_hi < rule.s_len), none | (k_lo >= rule.s_len)
  shape = (len(masks), n_q, n_k)
  full = jnp.broadcast_to(every & ~none, shape)
  keep = jnp.broadcast_to(~none, shape)
  key = jnp.where(full, 0, jnp.where(keep, 1, 2)).astype(jnp.int32)
  table = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.stack([full.sum(-1), keep.sum(-1)], -1).astype(jnp.int32)
  return table, counts


def visited_tiles(counts: np.ndarray) -> int:
  return int(counts[..., 1].sum())


def segment_ranges(ids, block: int):
  """Per-tile (min, max) segment id: ids [B, L] with L a multiple of block -> 2 x [B, L/block]."""
  b, length = ids.shape
  tiles = ids.reshape(b, length // block, block)
  return tiles.min(-1), tiles.max(-1)


def segment_schedule(table: np.ndarray, counts: np.ndarray, outer_rng, inner_rng, *,
                     union_batch: bool = False):
  """Refines a static schedule with segment ids (run time, plain XLA, cheap).

  A tile is dropped when the segment-id ranges of its query and key blocks do not intersect
  (no pair can share a segment; exact for the usual packing, conservative otherwise), and a
  FULL tile stays FULL only when both blocks lie in one and the same segment, so FULL tiles
  still need no masking of any kind.

  Args:
    table, counts: the static schedule ([H', n_outer, M], [H', n_outer, 2]).
    outer_rng, inner_rng: (min, max) segment ids per outer / inner block, each [B, n].
    union_batch: one schedule for the whole batch (a tile is kept if any row needs it, FULL
      only if FULL in every row) instead of one per batch row.

  Returns:
    (table, counts) with a leading batch axis (size B, or 1 with union_batch): int32
    [B, H', n_outer, M] and [B, H', n_outer, 2].
  """
  table_j = jnp.asarray(table)[None]                                   # [1, H', nO, M]
  n_full = jnp.asarray(counts[..., 0])[None, :, :, None]               # [1, H', nO, 1]
  n_tot = jnp.asarray(counts[..., 1])[None, :, :, None]
  j = jnp.arange(table.shape[-1])[None, None, None, :]
  o_min, o_max = (x[:, None, :, None] for x in outer_rng)              # [B, 1, nO, 1]
  b = inner_rng[0].shape[0]
  i_min, i_max = (jnp.take(x, table_j.reshape(-1), axis=1).reshape((b, *table.shape))
                  for x in inner_rng)                                  # [B, H', nO, M]
  overlap = (o_min <= i_max) & (i_min <= o_max)
  one_segment = (o_min == o_max) & (i_min == i_max) & (o_min == i_min)
  keep = (j < n_tot) & overlap
  full = keep & (j < n_full) & one_segment
  if union_batch:
    keep, full = keep.any(0, keepdims=True), full.all(0, keepdims=True)
  key = jnp.where(full, 0, jnp.where(keep, 1, 2)).astype(jnp.int32)
  order = jnp.argsort(key, axis=-1, stable=True)
  new_table = jnp.take_along_axis(jnp.broadcast_to(table_j, key.shape), order, axis=-1)
  new_counts = jnp.stack([full.sum(-1), keep.sum(-1)], -1).astype(jnp.int32)
  return new_table.astype(jnp.int32), new_counts


def pad_axis(x, axis: int, length: int, value=0):
  """Pads x along axis up to length (no-op when already that long)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def pad_edge(x, axis: int, length: int):
  """Pads by repeating the last entry (segment ids: padding must not widen a tile's range)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode="edge")


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m
