"""Mask: closed-form density / block layout agree exactly with the dense element rule."""

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from memx.kernels.attention import CAUSAL, EMPTY, FULL, PARTIAL, BlockSparse, Mask, moa_windows
from memx.kernels.attention import _schedule as sched

_window = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def masks_and_sizes(draw):
  t, s = draw(st.integers(1, 70)), draw(st.integers(1, 70))
  heads = draw(st.sampled_from([None, 3]))
  field = (lambda strat: strat if heads is None else st.tuples(*[strat] * heads))
  layout = None
  if draw(st.booleans()):
    lq, lk = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
    shape = (heads or 1, -(-t // lq), -(-s // lk))
    bits = draw(st.lists(st.booleans(), min_size=int(np.prod(shape)),
                         max_size=int(np.prod(shape))))
    layout = BlockSparse(np.array(bits).reshape(shape), block_q=lq, block_k=lk)
  mask = Mask(causal=draw(st.booleans()), window_left=draw(field(_window)),
              window_right=draw(field(_window)),
              n_sink=draw(field(st.integers(0, min(s, 6)))),
              q_offset=draw(st.integers(0, 40)), block_sparse=layout)
  return mask, t, s


def _dense_np(m, t, s):
  """The element rule of `Mask`, restated in numpy for one head-uniform mask."""
  p = np.arange(t)[:, None] + m.q_offset
  j = np.arange(s)[None, :]
  ok = (j <= p) if m.causal else np.ones((t, s), bool)
  band = np.ones((t, s), bool)
  if m.window_left is not None:
    band &= p - j <= m.window_left
  if m.window_right is not None:
    band &= j - p <= m.window_right
  ok = ok & (band | (j < m.n_sink))
  if m.block_sparse is not None:
    bs = m.block_sparse
    ok &= bs.layout[0][np.arange(t)[:, None] // bs.block_q, np.arange(s)[None, :] // bs.block_k]
  return ok


def _dense_heads(mask, t, s):
  n = mask.num_heads
  return np.stack([_dense_np(mask.head(h), t, s) for h in range(n or 1)])


@pytest.mark.parametrize("mask", [
    CAUSAL, Mask(causal=False, window_left=3, window_right=1, n_sink=2),
    Mask(q_offset=5, window_left=2, block_sparse=BlockSparse(np.array([[1, 0], [1, 1]]),
                                                             block_q=16, block_k=16)),
])
def test_mask_dense_matches_numpy_restatement(mask):
  np.testing.assert_array_equal(np.asarray(mask.dense(20, 30)), _dense_np(mask, 20, 30))


@settings(max_examples=60, deadline=None)
@given(masks_and_sizes(), st.sampled_from([16, 32]), st.sampled_from([16, 32]))
def test_density_and_block_layout_match_dense(mask_t_s, bq, bk):
  mask, t, s = mask_t_s
  dense = _dense_heads(mask, t, s)
  np.testing.assert_array_equal(mask.visited_pairs(t, s), dense.sum((1, 2)))
  assert mask.density(t, s) == pytest.approx(dense.mean())
  if mask.block_sparse is not None and (mask.block_sparse.block_q % bq
                                        or mask.block_sparse.block_k % bk):
    with pytest.raises(ValueError, match="nest"):
      mask.block_layout(t, s, bq, bk)
    return
  layout = mask.block_layout(t, s, bq, bk)
  nq, nk = -(-t // bq), -(-s // bk)
  assert layout.shape == (dense.shape[0], nq, nk) and layout.dtype == np.int8
  padded = np.zeros((dense.shape[0], nq * bq, nk * bk), bool)
  padded[:, :t, :s] = dense
  tiles = padded.reshape(dense.shape[0], nq, bq, nk, bk)
  want = np.where(~tiles.any((2, 4)), EMPTY, np.where(tiles.all((2, 4)), FULL, PARTIAL))
  np.testing.assert_array_equal(layout, want)


def test_known_densities():
  assert CAUSAL.density(4, 4) == pytest.approx(10 / 16)
  assert Mask(causal=False).density(3, 5) == 1.0
  # Decode: one query at position 9 sees keys 0..9 of 16.
  assert Mask(q_offset=9).density(1, 16) == pytest.approx(10 / 16)
  # Window 1 + sink 1 on 4 tokens: rows see {0}, {0,1}, {0,1,2}, {0,2,3}.
  assert Mask(window_left=1, n_sink=1).visited_pairs(4, 4).tolist() == [1 + 2 + 3 + 3]


def test_per_head_fields_normalise_and_hash():
  a = Mask(window_left=[3, None], n_sink=np.array([1, 0]))
  b = Mask(window_left=(3, None), n_sink=(1, 0))
  assert a == b and hash(a) == hash(b)
  assert a.num_heads == 2 and a.head(1) == Mask(window_left=None, n_sink=0)
  layout = np.array([[True, False], [True, True]])
  assert BlockSparse(layout, block_q=16, block_k=16) == BlockSparse(layout.astype(int),
                                                                    block_q=16, block_k=16)
  assert hash(Mask(block_sparse=BlockSparse(layout, block_q=16, block_k=16))) == hash(
      Mask(block_sparse=BlockSparse(layout.copy(), block_q=16, block_k=16)))
  with pytest.raises(ValueError, match="pass head"):
    a.dense(4, 4)


def test_moa_windows_hits_target_density():
  mask = moa_windows(8, 1024, 0.125, n_sink=16)
  assert mask.num_heads == 8
  assert abs(mask.density(1024, 1024) - 0.125) < 2e-3
  wins = mask.window_left
  assert list(wins) == sorted(wins) and wins[-1] > 2 * wins[0]  # heterogeneous heads


def test_schedule_lists_visited_tiles_full_first():
  mask = Mask(window_left=20, n_sink=4)
  table, counts = sched.schedule((mask,), 64, 64, 16, 16, False, 64, 64)
  layout = mask.block_layout(64, 64, 16, 16)[0]
  for qb in range(4):
    n_full, n_tot = counts[0, qb]
    row = table[0, qb, :n_tot].tolist()
    assert sorted(row) == np.flatnonzero(layout[qb] != EMPTY).tolist()
    assert all(layout[qb, j] == FULL for j in row[:n_full])
    assert all(layout[qb, j] == PARTIAL for j in row[n_full:])
  table_t, counts_t = sched.schedule((mask,), 64, 64, 16, 16, True, 64, 80)
  assert counts_t.shape == (1, 5, 2) and counts_t[0, 4, 1] == 0  # padding tiles are EMPTY
  assert counts_t[..., 1].sum() == counts[..., 1].sum()


def test_segment_schedule_drops_tiles_across_documents():
  table, counts = sched.schedule((CAUSAL,), 64, 64, 16, 16, False, 64, 64)
  ids = jnp.asarray([[0] * 32 + [1] * 32, [0] * 16 + [1] * 48])
  rng = sched.segment_ranges(ids, 16)
  tbl, cnt = sched.segment_schedule(table, counts, rng, rng)
  # Row 0: two documents of two tiles each -> causal tiles inside each document only.
  assert np.asarray(cnt[0, 0, :, 1]).tolist() == [1, 2, 1, 2]
  assert np.asarray(cnt[0, 0, :, 0]).tolist() == [0, 1, 0, 1]  # diagonal tiles stay PARTIAL
  assert np.asarray(tbl[0, 0, 3, :2]).tolist() == [2, 3]
  assert np.asarray(cnt[1, 0, :, 1]).tolist() == [1, 1, 2, 3]


@pytest.mark.parametrize("mask", [
    Mask(causal=True),
    Mask(causal=True, window_left=(3, 10, 0), n_sink=(2, 0, 5)),
    Mask(causal=False, window_left=5, window_right=2, q_offset=3),
    Mask(causal=True, block_sparse=BlockSparse(np.array([[1, 0], [1, 1], [0, 1]], bool),
                                               block_q=16, block_k=32)),
])
def test_block_counts_match_dense_tiles(mask):
  t, s, bq, bk = 40, 50, 16, 16
  counts = mask.block_counts(t, s, bq, bk)
  heads = mask.num_heads or 1
  for h in range(heads):
    dense = np.asarray(mask.dense(t, s, head=h if mask.num_heads else None))
    padded = np.zeros((3 * bq, 4 * bk), bool)
    padded[:t, :s] = dense
    want = padded.reshape(3, bq, 4, bk).sum((1, 3))
    np.testing.assert_array_equal(counts[h], want)
  np.testing.assert_array_equal(counts.sum((1, 2)), mask.visited_pairs(t, s))


@pytest.mark.parametrize("mask, want", [
    (CAUSAL, (True, True)),
    (Mask(window_left=256), (True, True)),
    (Mask(window_left=(64, 512)), (True, True)),          # per-head bands, each consecutive
    (Mask(window_left=128, n_sink=4), (True, True)),      # a partial sink tile: not FULL
    # A FULL sink tile, a gap, then the band (query rows); per key block still one run.
    (Mask(window_left=256, n_sink=64), (False, True)),
])
def test_contiguous_prefix(mask, want):
  """The kernels walk each row's leading run of consecutive FULL tiles as first + j: the
  prefix is checked against a direct reading of the table, forward (query rows) and transposed
  (key rows, the dK/dV pass), in numpy and in jnp (segment-refined schedules)."""
  masks = (mask,) if mask.num_heads is None else tuple(
      Mask(window_left=w) for w in mask.window_left)
  for transpose, whole_rows in zip((False, True), want, strict=True):
    table, counts = sched.schedule(masks, 1024, 1024, 64, 64, transpose, 1024, 1024)
    prefix = sched.contiguous_prefix(table, counts)
    np.testing.assert_array_equal(prefix, sched.contiguous_prefix(jnp.asarray(table),
                                                                  jnp.asarray(counts)))
    for h in range(table.shape[0]):
      for i in range(table.shape[1]):
        row = table[h, i, :counts[h, i, 0]]
        run = next((n for n in range(1, len(row)) if row[n] != row[0] + n), len(row))
        assert prefix[h, i] == run
    assert bool((prefix == counts[..., 0]).all()) == whole_rows
    assert sched.with_prefix(table, counts).shape == (*counts.shape[:-1], 3)


def test_segment_schedule_prefix_stops_at_a_gap():
  """Segment ids with a document split by another: the row's FULL tiles skip the other's
  blocks, so its contiguous prefix is shorter than its FULL count."""
  table, counts = sched.schedule((CAUSAL,), 96, 96, 16, 16, False, 96, 96)
  ids = jnp.asarray([[0] * 32 + [1] * 16 + [0] * 48])
  rng = sched.segment_ranges(ids, 16)
  tbl, cnt = sched.segment_schedule(table, counts, rng, rng)
  cnt3 = np.asarray(sched.with_prefix(tbl, cnt))
  assert np.asarray(tbl[0, 0, 5, :4]).tolist() == [0, 1, 3, 4]   # FULL: blocks 0, 1, 3, 4
  assert cnt3[0, 0, 5].tolist() == [4, 5, 2]                       # prefix 0, 1; then 3, 4


def test_mask_fields_fit_the_kernels_int32_and_accept_numpy_scalars():
  """Windows, sinks and offsets are int32 in the kernels: values that would overflow are refused
  when the mask is built (not as an OverflowError while tracing); numpy scalars are plain
  values, numpy vectors per-head values."""
  for field in ("window_left", "window_right", "n_sink", "q_offset"):
    with pytest.raises(ValueError, match=rf"Mask.{field}.* \[0, 2\*\*30\)"):
      Mask(**{field: 1 << 31})
  with pytest.raises(ValueError, match=r"Mask.window_left\[1\]"):
    Mask(window_left=(3, 1 << 31))
  assert Mask(window_left=np.array(3), n_sink=np.array(2)) == Mask(window_left=3, n_sink=2)
  assert Mask(window_left=np.array([1, 2])).window_left == (1, 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_head_selection_by_slices_equals_indexing(idx):
  """xla's per-head groups pick heads by slices and broadcasts (no gather, whose transpose is a
  scatter-add): the same values as indexing, for any static index list."""
  import numpy as np

  from memx.kernels.attention.xla import _heads

  x = jnp.arange(2 * 3 * 6 * 4, dtype=jnp.float32).reshape(2, 3, 6, 4)
  np.testing.assert_array_equal(np.asarray(_heads(x, idx)), np.asarray(x)[:, :, idx])
