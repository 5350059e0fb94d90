"""H2O (Zhang et al. 2023): a decode cache of fixed size that keeps the recent tokens and the
"heavy hitters", the tokens that have received the most attention so far.

`H2O(heavy, recent)` gives each full-causal attention layer a cache of budget = heavy + recent
slots per KV head (`EvictCache`). Every slot remembers its token's position and its score: the
attention probability the token has received, summed over the queries that saw it and over
the query heads sharing the KV head (GQA), prompt included.

* Prefill (the whole prompt at once): the prompt attends to itself exactly; the scores are
  the column sums of its causal attention (`key_scores`, computed block by block over the
  queries, never a [T, T] matrix per head), or with `observe` = w of its last w rows only
  (SnapKV's observation window, which keeps what the end of the prompt looks at). A prompt
  longer than the budget keeps its `recent` last tokens and the `heavy` highest-scoring
  earlier ones (`select`).
* Chunked prefill (`extend`, Locret's setting): each chunk attends to what is held and
  causally to itself, scores grow by its attention, and the recent latest plus the highest
  scores stay, so a long prompt never holds more than the budget.
* Step at position p: the query attends to the held tokens and the new one (budget + 1
  keys), every score grows by the probability the query gave it, and if the cache is full the
  lowest-scoring token outside the recent window (positions > p - recent, the new token
  included) leaves; the new token takes its slot. An empty slot is used first, so a budget of
  at least the sequence length never evicts and equals the dense cache.

Eviction is per sequence and per KV head. Keys are stored after RoPE, so a kept token keeps its
position. Layers with a window, sinks, per-head rules or a sparse plan keep their own caches
(they are bounded already). The state is the cache's keys and values plus an int32 position
and a float32 score per slot (`evict_cache_bytes` counts them all).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from memx.kernels.attention import Mask
from memx.kernels.attention.reference import MASK_VALUE

# Query rows per block when scoring a prompt's keys (the score matrix of one block is
# [B, H, QUERY_BLOCK, T] float32).
QUERY_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class H2O:
  """Keep `heavy` heavy-hitter tokens and the `recent` most recent ones per KV head (the new
  token counts among the recent ones). observe: 0 scores a prompt's tokens by the attention of
  all its queries (H2O); w > 0 by that of its last w queries only (SnapKV's observation
  window: the end of a prompt, often the question, picks what stays); steps accumulate as
  H2O either way. pool: rank the prompt's tokens by the largest score within `pool` positions
  centred on each (odd; 1 = none), as SnapKV max-pools, so a token next to a peak stays with
  it (a number spans several tokens)."""

  heavy: int = 64
  recent: int = 64
  observe: int = 0
  pool: int = 1

  def __post_init__(self):
    for name, low in (("heavy", 0), ("recent", 1), ("observe", 0), ("pool", 1)):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"H2O: {name} must be an int >= {low}, got {v!r}")
    if self.pool % 2 == 0:
      raise ValueError(f"H2O: pool must be odd (a window centred on each token), got "
                       f"{self.pool}")

  @property
  def budget(self) -> int:
    return self.heavy + self.recent

  @property
  def name(self) -> str:
    return (f"h2o{self.heavy}+{self.recent}" + (f"o{self.observe}" if self.observe else "")
            + (f"p{self.pool}" if self.pool > 1 else ""))

  def slots(self, max_len: int) -> int:
    """Slots per KV head for a cache of max_len positions."""
    return min(self.budget, max_len)

  @classmethod
  def parse(cls, text: str) -> H2O:
    """"HEAVY:RECENT[:OBSERVE[:POOL]]", e.g. "64:64" or "64:64:32:7"."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 4) or not all(p.strip().isdigit() for p in parts):
      raise ValueError(f"H2O: expected HEAVY:RECENT[:OBSERVE[:POOL]] (non-negative ints), got "
                       f"{text!r}")
    return cls(*(int(p) for p in parts))

  def observed(self, q):
    """The prompt queries q [B, T, ...] whose attention scores the prompt, and the position of
    the first."""
    t = q.shape[1]
    if self.observe == 0 or self.observe >= t:
      return q, 0
    return q[:, t - self.observe:], t - self.observe


def applies(mask: Mask) -> bool:
  """H2O caches a layer whose keys are all visible to later queries: plain causal attention."""
  return (mask.causal and mask.window_left is None and mask.window_right is None
          and mask.n_sink == 0 and mask.block_sparse is None)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("k", "v", "pos", "score"),
                   meta_fields=("spec", "max_len"))
@dataclasses.dataclass(frozen=True)
class EvictCache:
  """One attention layer's H2O state: k, v [B, S, G, K], pos [B, S, G] int32 (-1: empty),
  score [B, S, G] float32, S = spec.slots(max_len)."""

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  score: jax.Array
  spec: H2O
  max_len: int


def init_evict_cache(spec: H2O, batch: int, max_len: int, kv_heads: int, head_dim: int,
                     dtype) -> EvictCache:
  s = spec.slots(max_len)
  kv = (batch, s, kv_heads, head_dim)
  return EvictCache(jnp.zeros(kv, dtype), jnp.zeros(kv, dtype),
                    jnp.full((batch, s, kv_heads), -1, jnp.int32),
                    jnp.zeros((batch, s, kv_heads), jnp.float32), spec, max_len)


def evict_cache_bytes(spec: H2O, batch: int, max_len: int, kv_heads: int, head_dim: int,
                      itemsize: int) -> int:
  """Bytes of `init_evict_cache`'s arrays: keys and values, int32 positions, float32 scores."""
  slots = batch * spec.slots(max_len) * kv_heads
  return slots * (2 * head_dim * itemsize + 4 + 4)


def key_scores(q, k, scale: float, q_start: int = 0) -> jax.Array:
  """The attention each key of a prompt receives under causal attention: q [B, C, H, K] (the
  queries at positions q_start .. q_start + C - 1), k [B, T, G, K] (positions 0 .. T - 1) →
  [B, T, G] float32, the softmax probabilities summed over the query rows and the query heads
  of each KV head. Computed QUERY_BLOCK query rows at a time."""
  b, c, h, d = q.shape
  t, g = k.shape[1:3]
  n = -(-c // QUERY_BLOCK)
  qp = jnp.pad(q, ((0, 0), (0, n * QUERY_BLOCK - c), (0, 0), (0, 0)))
  blocks = qp.reshape(b, n, QUERY_BLOCK, g, h // g, d).transpose(1, 0, 2, 3, 4, 5)

  def one(args):
    i, qb = args                                                   # qb [B, C, G, R, K]
    s = jnp.einsum("bcgrd,btgd->bgrct", qb, k, preferred_element_type=jnp.float32) * scale
    rows = q_start + i * QUERY_BLOCK + jnp.arange(QUERY_BLOCK)            # positions
    ok = (jnp.arange(t)[None, :] <= rows[:, None]) & (rows[:, None] < q_start + c)  # [C, T]
    p = jax.nn.softmax(jnp.where(ok, s, MASK_VALUE), axis=-1)
    return jnp.where(ok, p, 0.0).sum(axis=(2, 3))                 # [B, G, T]

  per_block = jax.lax.map(one, (jnp.arange(n), blocks))
  return per_block.sum(axis=0).transpose(0, 2, 1)                  # [B, T, G]


def select(spec: H2O, scores, t: int) -> jax.Array:
  """Positions a cache keeps after a prompt of t tokens: [B, min(budget, t), G] int32. t <=
  budget: every position. Else the `recent` last ones and the `heavy` highest scores among
  the rest, max-pooled over `pool` positions (heavy first, each part in position order)."""
  b, _, g = scores.shape
  if t <= spec.budget:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None], (b, t, g))
  older = t - spec.recent
  recent = jnp.broadcast_to(jnp.arange(older, t, dtype=jnp.int32)[None, :, None],
                            (b, spec.recent, g))
  if spec.heavy == 0:
    return recent
  rank = scores[:, :older]
  if spec.pool > 1:  # the largest score within pool // 2 positions either side
    half = spec.pool // 2
    rank = jax.lax.reduce_window(rank, -jnp.inf, jax.lax.max, (1, spec.pool, 1), (1, 1, 1),
                                 ((0, 0), (half, half), (0, 0)))
  _, heavy = jax.lax.top_k(jnp.swapaxes(rank, 1, 2), spec.heavy)    # [B, G, heavy]
  heavy = jnp.sort(heavy, axis=-1).astype(jnp.int32)
  return jnp.concatenate([jnp.swapaxes(heavy, 1, 2), recent], axis=1)


def fill(cache: EvictCache, k, v, scores) -> EvictCache:
  """The cache after a prompt: k, v [B, T, G, K] and their key_scores [B, T, G]."""
  t = k.shape[1]
  held = select(cache.spec, scores, t)                              # [B, <= S, G]
  if held.shape[1] < cache.k.shape[1]:                              # room left: empty slots
    held = jnp.pad(held, ((0, 0), (0, cache.k.shape[1] - held.shape[1]), (0, 0)),
                   constant_values=-1)
  safe = jnp.maximum(held, 0)
  take = lambda a: jnp.take_along_axis(a, safe[..., None], axis=1)   # noqa: E731
  empty = held < 0
  return dataclasses.replace(
      cache, k=jnp.where(empty[..., None], 0, take(k)).astype(cache.k.dtype),
      v=jnp.where(empty[..., None], 0, take(v)).astype(cache.v.dtype), pos=held,
      score=jnp.where(empty, 0.0, jnp.take_along_axis(scores, safe, axis=1)))


def extend(cache: EvictCache, q, k, v, start, scale: float):
  """Continues a prompt by a chunk (Locret's setting: a long prompt prefilled chunk by chunk in
  a cache that never exceeds the budget): q [B, C, H, K], k, v [B, C, G, K] at positions
  start .. start + C - 1 (an int or traced), on a cache holding earlier positions →
  (out [B, C, H, K] float32, the cache after the chunk).

  The chunk's queries attend to the held tokens and causally to the chunk. Every held token's
  score grows by the attention the chunk's queries gave it and every chunk token starts with
  the attention it received; then the `recent` latest positions stay and the highest scores
  fill the other slots. From an empty cache this is the whole-prompt prefill (`fill` on
  `key_scores`) of that chunk; the observation window and pooling apply to whole prompts
  only."""
  b, c, h, d = q.shape
  g = k.shape[2]
  spec = cache.spec
  qg = q.reshape(b, c, g, h // g, d)
  held = (cache.pos >= 0) & (cache.pos < start)                      # [B, S, G]
  s_held = jnp.einsum("bcgrd,bsgd->bgrcs", qg, cache.k, preferred_element_type=jnp.float32)
  s_new = jnp.einsum("bcgrd,btgd->bgrct", qg, k, preferred_element_type=jnp.float32)
  s_held = jnp.where(jnp.swapaxes(held, 1, 2)[:, :, None, None], s_held * scale, MASK_VALUE)
  causal = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]          # [C(query), C(key)]
  s_new = jnp.where(causal, s_new * scale, MASK_VALUE)
  p = jax.nn.softmax(jnp.concatenate([s_held, s_new], axis=-1), axis=-1)
  n_slots = cache.pos.shape[1]
  p_held, p_new = p[..., :n_slots], jnp.where(causal, p[..., n_slots:], 0.0)
  out = (jnp.einsum("bgrcs,bsgd->bcgrd", p_held, cache.v.astype(jnp.float32))
         + jnp.einsum("bgrct,btgd->bcgrd", p_new, v.astype(jnp.float32)))
  # Candidates: the held slots and the chunk's tokens, [B, S + C, G].
  positions = jnp.concatenate(
      [jnp.where(held, cache.pos, -1),
       jnp.broadcast_to((start + jnp.arange(c, dtype=jnp.int32))[None, :, None], (b, c, g))],
      axis=1)
  scores = jnp.concatenate([cache.score + jnp.swapaxes(p_held.sum(axis=(2, 3)), 1, 2),
                            jnp.swapaxes(p_new.sum(axis=(2, 3)), 1, 2)], axis=1)
  end = start + c
  rank = jnp.where(positions < 0, -jnp.inf,
                   jnp.where(positions >= end - spec.recent, jnp.inf, scores))
  _, keep = jax.lax.top_k(jnp.swapaxes(rank, 1, 2), n_slots)         # [B, G, S]
  keep = jnp.swapaxes(keep, 1, 2)                                     # [B, S, G]
  pick = lambda a: jnp.take_along_axis(a, keep.reshape(keep.shape + (1,) * (a.ndim - 3)),  # noqa: E731
                                       axis=1)
  kv = lambda old, new: pick(jnp.concatenate([old, new.astype(old.dtype)], axis=1))  # noqa: E731
  pos = pick(positions)
  return out.reshape(b, c, h, d), dataclasses.replace(
      cache, k=kv(cache.k, k), v=kv(cache.v, v), pos=pos,
      score=jnp.where(pos < 0, 0.0, pick(scores)))


def step(cache: EvictCache, q, k, v, pos, scale: float):
  """One query q [B, H, K] at position pos (scalar) with its key and value k, v [B, G, K] →
  (out [B, H, K] float32, the cache with scores grown and the new token held)."""
  b, h, d = q.shape
  g = k.shape[1]
  spec = cache.spec
  qg = q.reshape(b, g, h // g, d)
  # Slots holding a position >= pos are treated as empty: a cache fed back after its position
  # was rewound (a benchmark repeating the same steps) never attends to a "future" token.
  held = (cache.pos >= 0) & (cache.pos < pos)                         # [B, S, G]
  s_held = jnp.einsum("bgrd,bsgd->bgrs", qg, cache.k, preferred_element_type=jnp.float32)
  s_new = jnp.einsum("bgrd,bgd->bgr", qg, k, preferred_element_type=jnp.float32)[..., None]
  s_held = jnp.where(jnp.swapaxes(held, 1, 2)[:, :, None], s_held * scale, MASK_VALUE)
  p = jax.nn.softmax(jnp.concatenate([s_held, s_new * scale], axis=-1), axis=-1)
  p_held, p_new = p[..., :-1], p[..., -1]                             # [B,G,R,S], [B,G,R]
  out = (jnp.einsum("bgrs,bsgd->bgrd", p_held, cache.v.astype(jnp.float32))
         + p_new[..., None] * v.astype(jnp.float32)[:, :, None])
  score = cache.score + jnp.swapaxes(p_held.sum(axis=2), 1, 2)        # [B, S, G]
  # The slot the new token takes: an empty one if any, else the lowest score outside the
  # recent window (the cache holds budget tokens older than pos, so one is always there).
  candidate = held & (cache.pos <= pos - spec.recent)
  key = jnp.where(~held, -jnp.inf, jnp.where(candidate, score, jnp.inf))
  victim = jnp.argmin(key, axis=1)                                    # [B, G]
  take = jnp.arange(cache.pos.shape[1])[None, :, None] == victim[:, None, :]   # [B, S, G]
  cache = dataclasses.replace(
      cache,
      k=jnp.where(take[..., None], k[:, None].astype(cache.k.dtype), cache.k),
      v=jnp.where(take[..., None], v[:, None].astype(cache.v.dtype), cache.v),
      pos=jnp.where(take, jnp.asarray(pos, jnp.int32), cache.pos),
      score=jnp.where(take, p_new.sum(axis=2)[:, None, :], score))
  return out.reshape(b, h, d), cache
