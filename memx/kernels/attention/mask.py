"""Mask: a small frozen description of which (query, key) pairs attention visits.

The mask is never a dense [T, S] array on the hot path. It is a handful of static numbers
(causal, windows, sinks, an offset), optionally per head, plus an optional block-sparse
layout. Implementations read it three ways:
  * `Mask.dense`: the [T, S] boolean matrix, built element by element (reference and tests);
  * `Mask.block_layout`: which kernel blocks are empty, partial or full (block skipping);
  * `Mask.density`: the exact fraction of visited pairs (sparse planning, benchmark FLOPs).
The last two are computed in closed form per query row with numpy, so they cost O(T·S/block)
even at S = 16k and agree with `dense` exactly (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

# Block classes in `Mask.block_layout` (the splash-attention convention): a kernel skips EMPTY
# blocks, computes FULL blocks without element masking and masks PARTIAL blocks element-wise.
EMPTY, PARTIAL, FULL = 0, 1, 2

# Stand-in for "unbounded" in integer arithmetic: larger than any sequence we will see.
_UNBOUNDED = 1 << 40

Window = int | None


def _is_int(x: Any) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


# Positions, windows and sinks are int32 inside the kernels (UNBOUNDED = 2**30 stands for "no
# limit"): larger values would overflow while tracing, so they are refused up front.
LIMIT = 1 << 30


def _per_head(value: Any) -> bool:
  return isinstance(value, tuple | list) or (isinstance(value, np.ndarray) and value.ndim > 0)


def _scalar(value: Any) -> Any:
  """A 0-d numpy array as its Python value (a window given as np.array(3))."""
  return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _norm_window(name: str, w: Any) -> Window | tuple[Window, ...]:
  """Validates a window field: None, an int >= 0, or a per-head sequence of those."""
  def one(x, where=""):
    if x is None:
      return None
    if not _is_int(x) or not 0 <= x < LIMIT:
      raise ValueError(f"Mask.{name}{where} = {x!r} is not allowed: must be None (unbounded) or "
                       f"an int in [0, 2**30).")
    return int(x)
  w = _scalar(w)
  if _per_head(w):
    seq = np.asarray(w, dtype=object).tolist() if isinstance(w, np.ndarray) else list(w)
    if not seq:
      raise ValueError(f"Mask.{name} is an empty sequence: give one entry per query head.")
    return tuple(one(x, f"[{i}]") for i, x in enumerate(seq))
  return one(w)


def _norm_sink(n: Any) -> int | tuple[int, ...]:
  def one(x, where=""):
    if not _is_int(x) or not 0 <= x < LIMIT:
      raise ValueError(f"Mask.n_sink{where} = {x!r} is not allowed: must be an int in "
                       "[0, 2**30).")
    return int(x)
  n = _scalar(n)
  if _per_head(n):
    seq = np.asarray(n).tolist() if isinstance(n, np.ndarray) else list(n)
    if not seq:
      raise ValueError("Mask.n_sink is an empty sequence: give one entry per query head.")
    return tuple(one(x, f"[{i}]") for i, x in enumerate(seq))
  return one(n)


class BlockSparse:
  """A block-sparse layout: for each head, which key blocks each query block may visit.

  `layout[h, i, j]` is True when query block i (rows [i·block_q, (i+1)·block_q) of q) may attend
  to key block j (columns [j·block_k, (j+1)·block_k) of k). Blocks are counted in local q/k
  indices, not absolute positions, so `q_offset` does not move them. The layout is intersected
  with the element rules of the Mask (causal, window, sinks): it removes pairs, never adds them.

  Attributes:
    layout: bool array [H or 1, ceil(T / block_q), ceil(S / block_k)] (a 2-D array means one
      layout shared by every head).
    block_q: query rows per layout block; a positive multiple of 16 (kernel tiles nest inside).
    block_k: key columns per layout block; a positive multiple of 16.
  """

  __slots__ = ("_hash", "block_k", "block_q", "layout")

  def __init__(self, layout: Any, *, block_q: int, block_k: int):
    arr = np.asarray(layout)
    if arr.dtype != np.bool_:
      if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"BlockSparse.layout must be boolean (or 0/1); got dtype {arr.dtype}.")
      arr = arr.astype(bool)
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
      raise ValueError(f"BlockSparse.layout must be [H, n_q_blocks, n_k_blocks] (or 2-D); got "
                       f"shape {np.shape(layout)}.")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
      if not _is_int(b) or b <= 0 or b % 16:
        raise ValueError(f"BlockSparse.{name} = {b!r} is not allowed: must be a positive "
                         f"multiple of 16 (kernel tiles are powers of two >= 16 nested inside).")
    arr = np.array(arr, copy=True)
    arr.flags.writeable = False
    object.__setattr__(self, "layout", arr)
    object.__setattr__(self, "block_q", int(block_q))
    object.__setattr__(self, "block_k", int(block_k))
    object.__setattr__(self, "_hash", hash((arr.shape, arr.tobytes(), block_q, block_k)))

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f"BlockSparse is frozen; cannot set {name}")

  def __eq__(self, other) -> bool:
    return (isinstance(other, BlockSparse) and self._hash == other._hash
            and self.block_q == other.block_q and self.block_k == other.block_k
            and self.layout.shape == other.layout.shape
            and bool((self.layout == other.layout).all()))

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    density = float(self.layout.mean())
    return (f"BlockSparse(layout={self.layout.shape}, block_q={self.block_q}, "
            f"block_k={self.block_k}, block_density={density:.3f})")

  @property
  def num_heads(self) -> int:
    return self.layout.shape[0]

  def head(self, h: int) -> BlockSparse:
    if self.num_heads == 1:
      return self
    return BlockSparse(self.layout[h:h + 1], block_q=self.block_q, block_k=self.block_k)

  def check_fits(self, t: int, s: int) -> None:
    """Raises ValueError unless the layout covers exactly a [t, s] score matrix."""
    want = (-(-t // self.block_q), -(-s // self.block_k))
    if self.layout.shape[1:] != want:
      raise ValueError(
          f"BlockSparse layout has {self.layout.shape[1:]} blocks but T={t}, S={s} with "
          f"block_q={self.block_q}, block_k={self.block_k} needs {want}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mask:
  """Which key positions each query position may attend to.

  Query i (0 <= i < T) sits at absolute position p = q_offset + i; key j (0 <= j < S) at
  position j. A pair is visited when every enabled rule allows it:

    causal:        j <= p
    window_left:   p - j <= window_left   (None = unbounded)
    window_right:  j - p <= window_right  (None = unbounded)
    n_sink:        keys j < n_sink are visible regardless of the windows (still causal)
    block_sparse:  layout[h, i // block_q, j // block_k] is True

  i.e. visible = causal_ok & (in_window | is_sink) & in_layout, and segment ids (an argument of
  `attention`, not part of the mask) remove pairs across segments. window_left, window_right and
  n_sink may each be a tuple with one entry per query head (MoA-style heterogeneous heads); a
  per-head window entry may be None. A query row that sees no key returns zeros.

  The mask is static (frozen, hashable) so it can be a `static_argnames` value and block
  schedules can be precomputed at trace time.
  """

  causal: bool = True
  window_left: Window | tuple[Window, ...] = None
  window_right: Window | tuple[Window, ...] = None
  n_sink: int | tuple[int, ...] = 0
  q_offset: int = 0
  block_sparse: BlockSparse | None = None

  def __post_init__(self):
    if not isinstance(self.causal, bool | np.bool_):
      raise ValueError(f"Mask.causal = {self.causal!r} is not allowed: must be a bool.")
    object.__setattr__(self, "causal", bool(self.causal))
    object.__setattr__(self, "window_left", _norm_window("window_left", self.window_left))
    object.__setattr__(self, "window_right", _norm_window("window_right", self.window_right))
    object.__setattr__(self, "n_sink", _norm_sink(self.n_sink))
    if not _is_int(self.q_offset) or not 0 <= self.q_offset < LIMIT:
      raise ValueError(f"Mask.q_offset = {self.q_offset!r} is not allowed: must be an int in "
                       "[0, 2**30).")
    object.__setattr__(self, "q_offset", int(self.q_offset))
    if self.block_sparse is not None and not isinstance(self.block_sparse, BlockSparse):
      raise ValueError(f"Mask.block_sparse = {self.block_sparse!r} is not allowed: must be a "
                       f"BlockSparse or None.")
    lengths = {name: len(getattr(self, name)) for name in ("window_left", "window_right", "n_sink")
               if isinstance(getattr(self, name), tuple)}
    if self.block_sparse is not None and self.block_sparse.num_heads > 1:
      lengths["block_sparse"] = self.block_sparse.num_heads
    if len(set(lengths.values())) > 1:
      raise ValueError(f"Mask per-head fields disagree on the number of heads: {lengths}.")

  # --- per-head structure -------------------------------------------------------------------

  @property
  def num_heads(self) -> int | None:
    """Number of query heads the mask is written for, or None when it is the same for all."""
    for name in ("window_left", "window_right", "n_sink"):
      if isinstance(getattr(self, name), tuple):
        return len(getattr(self, name))
    if self.block_sparse is not None and self.block_sparse.num_heads > 1:
      return self.block_sparse.num_heads
    return None

  def head(self, h: int) -> Mask:
    """The head-uniform mask that query head h sees."""
    if self.num_heads is None:
      return self
    pick = lambda x: x[h] if isinstance(x, tuple) else x
    return dataclasses.replace(
        self, window_left=pick(self.window_left), window_right=pick(self.window_right),
        n_sink=pick(self.n_sink),
        block_sparse=None if self.block_sparse is None else self.block_sparse.head(h))

  def heads(self, num_heads: int) -> tuple[Mask, ...]:
    """One head-uniform mask per query head (validates the per-head length)."""
    self.check_heads(num_heads)
    return tuple(self.head(h) for h in range(num_heads))

  def check_heads(self, num_heads: int) -> None:
    if self.num_heads is not None and self.num_heads != num_heads:
      raise ValueError(f"Mask has per-head entries for {self.num_heads} heads but the query has "
                       f"{num_heads} heads.")

  def check_fits(self, t: int, s: int, num_heads: int | None = None) -> None:
    """Raises ValueError when the mask cannot describe a [t, s] problem with num_heads heads."""
    if num_heads is not None:
      self.check_heads(num_heads)
    sinks = self.n_sink if isinstance(self.n_sink, tuple) else (self.n_sink,)
    if max(sinks) > s:
      raise ValueError(f"Mask.n_sink = {self.n_sink} is out of range: at most S = {s} keys exist.")
    if self.block_sparse is not None:
      self.block_sparse.check_fits(t, s)

  # --- dense view (reference, tests) ---------------------------------------------------------

  def dense(self, t: int, s: int, *, head: int | None = None) -> jnp.ndarray:
    """The [T, S] boolean matrix of visited pairs for one head, built element by element.

    O(T·S) memory: for the reference implementation and tests only. `head` is required when
    the mask has per-head entries.
    """
    if head is None and self.num_heads is not None:
      raise ValueError("Mask.dense: this mask is per-head; pass head=h.")
    m = self if head is None else self.head(head)
    q = jnp.arange(t)[:, None] + m.q_offset
    k = jnp.arange(s)[None, :]
    ok = jnp.ones((t, s), bool)
    if m.causal:
      ok &= k <= q
    in_window = jnp.ones((t, s), bool)
    if m.window_left is not None:
      in_window &= q - k <= m.window_left
    if m.window_right is not None:
      in_window &= k - q <= m.window_right
    if m.n_sink:
      in_window |= k < m.n_sink
    ok &= in_window
    if m.block_sparse is not None:
      m.block_sparse.check_fits(t, s)
      layout = m.block_sparse.layout[0]
      rows = np.arange(t) // m.block_sparse.block_q
      cols = np.arange(s) // m.block_sparse.block_k
      ok &= jnp.asarray(layout[rows[:, None], cols[None, :]])
    return ok

  # --- block structure and density (closed form, numpy) -------------------------------------

  def block_layout(self, t: int, s: int, block_q: int, block_k: int) -> np.ndarray:
    """Classifies every [block_q, block_k] tile of the [T, S] score matrix.

    Returns:
      int8 array [H, ceil(T / block_q), ceil(S / block_k)] (H = num_heads, or 1 for a
      head-uniform mask) holding EMPTY (0: no visited pair, skip), PARTIAL (1: some pairs,
      mask element-wise) or FULL (2: every pair visited, no masking). Tiles that stick out past
      T or S are never FULL.

    Raises:
      ValueError: block sizes are not positive, or the block-sparse layout's blocks are not a
        multiple of them (kernel tiles must nest inside layout blocks).
    """
    for name, b in (("block_q", block_q), ("block_k", block_k)):
      if not _is_int(b) or b <= 0:
        raise ValueError(f"Mask.block_layout: {name} = {b!r} must be a positive int.")
    self.check_fits(t, s)
    if self.block_sparse is not None:
      bs = self.block_sparse
      if bs.block_q % block_q or bs.block_k % block_k:
        raise ValueError(
            f"Block-sparse layout blocks ({bs.block_q}, {bs.block_k}) are not a multiple of the "
            f"kernel blocks ({block_q}, {block_k}): kernel tiles must nest inside layout blocks.")
    n = self.num_heads
    heads = (self,) if n is None else tuple(self.head(h) for h in range(n))
    return np.stack([_classify(m, t, s, block_q, block_k) for m in heads])

  def block_counts(self, t: int, s: int, block_q: int, block_k: int) -> np.ndarray:
    """Exact number of visited pairs in every [block_q, block_k] tile: int64 [H, nQ, nK].

    H = num_heads, or 1 for a head-uniform mask. Sparse planning weighs block-pooled
    attention profiles with it (memx.sparse.profile).
    """
    for name, b in (("block_q", block_q), ("block_k", block_k)):
      if not _is_int(b) or b <= 0:
        raise ValueError(f"Mask.block_counts: {name} = {b!r} must be a positive int.")
    self.check_fits(t, s)
    n = self.num_heads
    heads = (self,) if n is None else tuple(self.head(h) for h in range(n))
    return np.stack([_block_counts(m, t, s, block_q, block_k) for m in heads])

  def visited_pairs(self, t: int, s: int) -> np.ndarray:
    """Exact number of visited (query, key) pairs per head: int64 [H] (H = 1 if uniform)."""
    self.check_fits(t, s)
    n = self.num_heads
    heads = (self,) if n is None else tuple(self.head(h) for h in range(n))
    return np.array([_count_pairs(m, t, s) for m in heads], dtype=np.int64)

  def density(self, t: int, s: int) -> float:
    """Exact fraction of the T·S (query, key) pairs that are visited, averaged over heads."""
    return float(self.visited_pairs(t, s).mean() / (t * s)) if t * s else 0.0


CAUSAL = Mask()


def _row_counts(m: Mask, p: np.ndarray, k0: int, k1: int) -> np.ndarray:
  """Number of visible keys j in [k0, k1) for queries at absolute positions p (head-uniform m).

  The visible set is (band ∩ causal) ∪ (sinks ∩ causal) intersected with [k0, k1), where the
  band is [p - window_left, p + window_right]; both pieces are intervals, so the count is
  |band| + |sinks| - |band ∩ sinks|.
  """
  p = p.astype(np.int64)
  upper = p if m.causal else np.full_like(p, _UNBOUNDED)
  lo = np.maximum(k0, p - (_UNBOUNDED if m.window_left is None else m.window_left))
  hi = np.minimum(k1 - 1, upper)
  if m.window_right is not None:
    hi = np.minimum(hi, p + m.window_right)
  n = np.maximum(hi - lo + 1, 0)
  if m.n_sink:
    hi_sink = np.minimum(min(k1, m.n_sink) - 1, upper)
    n_sink = np.maximum(hi_sink - k0 + 1, 0)
    # Band and sink intervals both start at or after k0, so they overlap on [lo, min(hi, hi_s)].
    n_both = np.maximum(np.minimum(hi, hi_sink) - lo + 1, 0)
    n = n + n_sink - n_both
  return n


def _count_pairs(m: Mask, t: int, s: int) -> int:
  p = np.arange(t, dtype=np.int64) + m.q_offset
  if m.block_sparse is None:
    return int(_row_counts(m, p, 0, s).sum())
  # Sum the closed-form row counts over the key blocks the layout lets each row visit.
  bs = m.block_sparse
  layout = bs.layout[0]
  row_block = np.arange(t) // bs.block_q
  total = 0
  for j in range(-(-s // bs.block_k)):
    k0, k1 = j * bs.block_k, min((j + 1) * bs.block_k, s)
    total += int((_row_counts(m, p, k0, k1) * layout[row_block, j]).sum())
  return total


def _element_block_counts(m: Mask, t: int, s: int, block_q: int, block_k: int) -> np.ndarray:
  """Visited pairs per [block_q, block_k] tile from the element rules only (no layout)."""
  n_q, n_k = -(-t // block_q), -(-s // block_k)
  p = np.arange(n_q * block_q, dtype=np.int64) + m.q_offset
  row_valid = np.arange(n_q * block_q) < t
  counts = np.empty((n_q, n_k), np.int64)
  for j in range(n_k):
    k0, k1 = j * block_k, min((j + 1) * block_k, s)
    c = np.where(row_valid, _row_counts(m, p, k0, k1), 0)
    counts[:, j] = c.reshape(n_q, block_q).sum(-1)
  return counts


def _layout_keep(m: Mask, n_q: int, n_k: int, block_q: int, block_k: int) -> np.ndarray | bool:
  """Which tiles the block-sparse layout keeps (tiles nest inside layout blocks)."""
  if m.block_sparse is None:
    return True
  bs = m.block_sparse
  return bs.layout[0][(np.arange(n_q) * block_q) // bs.block_q][:, (np.arange(n_k) * block_k)
                                                               // bs.block_k]


def _block_counts(m: Mask, t: int, s: int, block_q: int, block_k: int) -> np.ndarray:
  if m.block_sparse is not None and (m.block_sparse.block_q % block_q
                                     or m.block_sparse.block_k % block_k):
    raise ValueError(f"Mask.block_counts: tiles ({block_q}, {block_k}) must nest inside the "
                     f"block-sparse layout blocks ({m.block_sparse.block_q}, "
                     f"{m.block_sparse.block_k}).")
  counts = _element_block_counts(m, t, s, block_q, block_k)
  return np.where(_layout_keep(m, *counts.shape, block_q, block_k), counts, 0)


@functools.lru_cache(maxsize=256)
def _classify(m: Mask, t: int, s: int, block_q: int, block_k: int) -> np.ndarray:
  """int8 [nQ, nK] block classes for one head-uniform mask (see Mask.block_layout)."""
  counts = _element_block_counts(m, t, s, block_q, block_k)
  cls = np.where(counts == 0, EMPTY, np.where(counts == block_q * block_k, FULL, PARTIAL))
  cls = np.where(_layout_keep(m, *counts.shape, block_q, block_k), cls, EMPTY)
  cls = cls.astype(np.int8)
  cls.flags.writeable = False
  return cls


def moa_windows(num_heads: int, s: int, density: float, *, n_sink: int = 0,
                spread: float = 4.0, causal: bool = True) -> Mask:
  """A MoA-style heterogeneous mask: per-head left windows whose mean density hits `density`.

  Heads get windows in a geometric progression spanning a factor `spread` (short local heads
  to long-range heads), scaled by bisection so that `Mask.density(s, s)` is as close to the
  target as integer windows allow. Used by benchmarks and tests; a real plan comes from
  profiling (MoA, Fu et al. 2024).
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"moa_windows: density = {density} must be in (0, 1].")
  shape = np.geomspace(1.0, spread, num_heads)

  def make(scale: float) -> Mask:
    wins = tuple(int(min(s, max(0, round(scale * x)))) for x in shape)
    return Mask(causal=causal, window_left=wins, n_sink=(n_sink,) * num_heads)

  lo, hi = 0.0, float(s)
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if make(mid).density(s, s) < density:
      lo = mid
    else:
      hi = mid
  return make(hi)


# --- length-elastic spans (MoA) ---------------------------------------------------------------

ElasticRule = tuple[float, float, int]  # (alpha, beta, n_sink)


def elastic_span(alpha: float, beta: float, length: int) -> int:
  """Keys a head sees behind (and including) each query at sequence length N: α + β·N,
  rounded half up and clipped to [1, N] (MoA's span rule)."""
  return int(min(length, max(1, math.floor(alpha + beta * length + 0.5))))


def elastic_mask(rules: tuple[ElasticRule, ...] | list[ElasticRule], length: int) -> Mask:
  """The per-head causal mask of MoA rules at sequence length N.

  Head h sees the span(α_h, β_h, N) most recent keys (window_left = span - 1) plus its first
  n_sink_h keys (clipped to N). A span >= N is dense causal attention.
  """
  if length <= 0:
    raise ValueError(f"elastic_mask: length = {length} must be a positive number of tokens.")
  spans = tuple(elastic_span(a, b, length) for a, b, _ in rules)
  sinks = tuple(min(int(n), length) for _, _, n in rules)
  return Mask(causal=True, window_left=tuple(sp - 1 for sp in spans), n_sink=sinks)
