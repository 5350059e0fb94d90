"""KV-cache decoding for `memx.nn.attention.Attention`: prefill and one-token steps.

Two cache layouts, chosen per layer by `init_cache` / `prefill` (a step reads the layout from
the cache it is given):

* dense, {"k", "v": [B, max_len, G, K]}: every layer without a sparse plan, and every layer
  when full=True. A step writes the new key/value at its position and attends over the whole
  cache with the layer's causal/window/sink mask, per-head masks included (fp32 softmax, as the
  kernels do). For a plan layer this is the exact oracle of the ring cache below.
* per-head rings (`PlanCache`), for layers of a MoA sparse plan (`cfg.attn_plan[layer]` is not
  None): query head h sees its span_h most recent keys plus its first sink_h keys, so KV head g
  (shared by query heads h with h // (H / G) == g) keeps only
    a sink part: slots [0, S_g) hold positions 0 .. S_g - 1, S_g = max sink_h, stored once;
    a ring:      slots [S_g, S_g + R_g) hold positions p >= S_g at S_g + (p - S_g) mod R_g,
                 R_g = min(max span_h, max_len - S_g)
  (capacity cap_g = S_g + R_g <= max_len), the KV heads' slots side by side in one [B, sum_g
  cap_g, K] buffer each for keys and values, plus the absolute position stored in every slot
  (int32, -1 = empty). A step scores all slots with one einsum and masks other KV heads' slots.
  Query head h at position pos sees slot s when 0 <= slot_pos[s] <= pos and (pos - slot_pos[s]
  <= span_h - 1 or slot_pos[s] < sink_h): exactly the keys the dense mask lets it see, since
  the ring always holds the R_g >= span_h most recent positions past the sinks. KV memory
  therefore follows the plan's density.

Plan length. A plan's spans depend on the sequence length N (span = clip(round(alpha + beta·N),
1, N)). For a generation N is the cache's max_len (prompt + generated tokens, known when the
cache is made): prefill and every step use the masks at N = max_len, so the cached and uncached
paths compute the same function (decoding max_len tokens equals `Attention.__call__` on those
max_len tokens, position by position), and a longer generation simply gets longer spans. A
prompt of T < max_len tokens is prefilled with the rows 0..T-1 of the mask at N = max_len (its
sinks clipped to the T keys present).

`kv_cache_bytes(cfg, max_len, batch)` is the exact number of bytes of keys and values the decode
state of a model holds for its attention layers (it equals the summed nbytes of those arrays in
`init_cache`); reports quote kv_cache_bytes(cfg, N) / N bytes per token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from memx.kernels.attention import Mask, attention
from memx.kernels.attention.chunk import UNBOUNDED, chunk_attention, head_rules, visible
from memx.kernels.attention.reference import MASK_VALUE
from memx.kernels.kv_quant import (
  KVQuant,
  QuantCache,
  decode_attention,
  init_quant_cache,
  quant_cache_bytes,
)
from memx.models.config import ModelConfig
from memx.nn._params import DTYPES
from memx.nn.attention import Attention, layer_mask
from memx.nn.kv_evict import (
  H2O,
  EvictCache,
  evict_cache_bytes,
  fill,
  init_evict_cache,
  key_scores,
)
from memx.nn.kv_evict import applies as evicts
from memx.nn.kv_evict import extend as evict_extend
from memx.nn.kv_evict import step as evict_step


def _prefix_mask(mask: Mask, t: int) -> Mask:
  """The mask of queries/keys 0..t-1 cut from a mask written for a longer sequence: the same
  rows, with sinks clipped to the t keys present (a sink past the last key sees nothing more)."""
  sink = mask.n_sink
  sink = tuple(min(n, t) for n in sink) if isinstance(sink, tuple) else min(sink, t)
  return dataclasses.replace(mask, n_sink=sink)


# --- per-head ring caches for sparse-plan layers ----------------------------------------------

def is_plan_layer(cfg: ModelConfig, layer: int) -> bool:
  """Whether attention layer `layer` follows a sparse plan (and so decodes with rings)."""
  return cfg.attn_plan is not None and cfg.attn_plan[layer] is not None


def ring_layout(mask: Mask, num_heads: int, num_kv_heads: int, max_len: int
                ) -> tuple[tuple[int, int], ...]:
  """(sink slots S_g, ring slots R_g) per KV head for a causal per-head mask at N = max_len.

  S_g = max sink_h and R_g = min(max span_h, max_len - S_g) over the query heads h of group g,
  where span_h = window_left_h + 1 (max_len when unbounded). S_g + R_g <= max_len.
  """
  left, right, sink = head_rules(mask, num_heads)
  if not mask.causal or (right != UNBOUNDED).any():
    raise NotImplementedError(f"ring KV cache: only causal masks without a right window are "
                              f"allowed, got {mask}")
  span = np.minimum(left[:, 0].astype(np.int64) + 1, max_len).reshape(num_kv_heads, -1)
  sink = np.minimum(sink[:, 0].astype(np.int64), max_len).reshape(num_kv_heads, -1)
  layout = []
  for g in range(num_kv_heads):
    n_sink = int(sink[g].max())
    layout.append((n_sink, int(min(span[g].max(), max_len - n_sink))))
  return tuple(layout)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("k", "v", "slot_pos"),
                   meta_fields=("max_len", "caps"))
@dataclasses.dataclass(frozen=True)
class PlanCache:
  """Decode state of one sparse-plan attention layer: a sink part + ring per KV head, the KV
  heads' slots side by side in one buffer (group g at slots `group(g)`), so that a decode step
  attends over all of them with one einsum instead of a few small kernels per KV head.

  k, v: [B, sum_g cap_g, K] in the compute dtype (cap_g = S_g + R_g of `ring_layout`).
  slot_pos: int32 [sum_g cap_g]: the absolute position in each slot, -1 when empty (shared by
    the batch rows, which decode in lockstep).
  max_len: the generation length N the plan's masks are taken at (static).
  caps: cap_g per KV head (static).
  """

  k: jax.Array
  v: jax.Array
  slot_pos: jax.Array
  max_len: int
  caps: tuple[int, ...]

  def group(self, g: int) -> slice:
    """The slots of KV head g."""
    start = sum(self.caps[:g])
    return slice(start, start + self.caps[g])


def _plan_layout(attn: Attention, max_len: int) -> tuple[tuple[int, int], ...]:
  cfg = attn.cfg
  return ring_layout(attn.mask(max_len), cfg.n_heads, cfg.kv_heads, max_len)


def _init_plan_cache(attn: Attention, batch: int, max_len: int) -> PlanCache:
  cfg = attn.cfg
  dt = DTYPES[cfg.compute_dtype]
  caps = tuple(s + r for s, r in _plan_layout(attn, max_len))
  total = sum(caps)
  return PlanCache(k=jnp.zeros((batch, total, cfg.head_dim), dt),
                   v=jnp.zeros((batch, total, cfg.head_dim), dt),
                   slot_pos=jnp.full((total,), -1, jnp.int32), max_len=max_len, caps=caps)


def _ring_slots(n_sink: int, n_ring: int, t: int) -> np.ndarray:
  """int32 [n_sink + n_ring]: the position each slot of one KV head's buffer holds once
  positions 0..t-1 are written (-1 = empty). Static: the layout follows from t alone."""
  pos = np.full(n_sink + n_ring, -1, np.int32)
  pos[:min(n_sink, t)] = np.arange(min(n_sink, t))
  if n_ring:
    ring = np.arange(max(n_sink, t - n_ring), t)
    pos[n_sink + (ring - n_sink) % n_ring] = ring
  return pos


def _write_ring(buf, val, start: int, n_sink: int, n_ring: int):
  """Writes the keys (or values) val [B, T, K] of positions start..start+T-1 into one KV head's
  buffer [B, cap, K] with static slices: the sink positions among them, and the last n_ring
  positions past the sinks (each slot written at most once)."""
  end = start + val.shape[1]
  if start < n_sink:
    buf = jax.lax.dynamic_update_slice_in_dim(buf, val[:, :min(n_sink, end) - start], start, 1)
  p0 = max(n_sink, start, end - n_ring)  # first position that lands in the ring
  n = end - p0
  if n > 0:
    s0 = (p0 - n_sink) % n_ring
    first = min(n, n_ring - s0)          # slots s0 .. n_ring - 1, then wrap to slot 0
    lo = p0 - start
    buf = jax.lax.dynamic_update_slice_in_dim(buf, val[:, lo:lo + first], n_sink + s0, 1)
    if n > first:
      buf = jax.lax.dynamic_update_slice_in_dim(buf, val[:, lo + first:], n_sink, 1)
  return buf


def _held_in_order(buf, start: int, n_sink: int, n_ring: int):
  """(keys [B, L, K], index of position `start`): one KV head's held keys (or values) in an
  order in which the masks' position arithmetic stays exact for queries at start and later.

  While start <= n_sink + n_ring nothing has been overwritten: slots 0..start-1 hold positions
  0..start-1. Later, the sinks (positions 0..n_sink-1) come first, then the ring rotated into
  position order (start - n_ring .. start - 1), so that position start sits at index
  n_sink + n_ring. Index differences then equal position differences for every ring key, and a
  sink slot a head does not treat as a sink lies further back by index (> n_ring, which is at
  least its span) than any window reaches, as it does by position: masks see what they would.
  """
  if start <= n_sink + n_ring:
    return buf[:, :start], start
  r0 = (start - n_sink) % n_ring  # slot of position start - n_ring: the oldest ring entry
  ring = buf[:, n_sink:]
  return jnp.concatenate([buf[:, :n_sink], ring[:, r0:], ring[:, :r0]], axis=1), n_sink + n_ring


def _plan_extend(attn: Attention, q, k, v, start: int, cache: PlanCache, mask: Mask):
  """Chunk attention for a ring-cache layer: per KV head, the chunk's queries over the keys it
  holds (`_held_in_order`) and the chunk's own keys; then the chunk is written into the rings."""
  cfg = attn.cfg
  layout = ring_layout(mask, cfg.n_heads, cfg.kv_heads, cache.max_len)
  _check_caps(attn, cache, layout)
  rep = cfg.n_heads // cfg.kv_heads
  heads = mask.heads(cfg.n_heads)
  end = start + q.shape[1]
  outs, ks, vs = [], [], []
  for g, (n_sink, n_ring) in enumerate(layout):
    kg, vg = cache.k[:, cache.group(g)], cache.v[:, cache.group(g)]
    (k_held, offset), (v_held, _) = (_held_in_order(buf, start, n_sink, n_ring)
                                     for buf in (kg, vg))
    hs = heads[g * rep:(g + 1) * rep]
    group_mask = Mask(causal=True, window_left=tuple(m.window_left for m in hs),
                      n_sink=tuple(min(m.n_sink, end) for m in hs), q_offset=offset)
    keys = jnp.concatenate([k_held, k[:, :, g]], axis=1)[:, :, None]
    vals = jnp.concatenate([v_held, v[:, :, g]], axis=1)[:, :, None]
    outs.append(attention(q[:, :, g * rep:(g + 1) * rep], keys, vals, mask=group_mask,
                          implementation=cfg.attn_impl))
    ks.append(_write_ring(kg, k[:, :, g], start, n_sink, n_ring))
    vs.append(_write_ring(vg, v[:, :, g], start, n_sink, n_ring))
  slot_pos = np.concatenate([_ring_slots(s, r, end) for s, r in layout])
  cache = dataclasses.replace(cache, k=jnp.concatenate(ks, axis=1),
                              v=jnp.concatenate(vs, axis=1), slot_pos=jnp.asarray(slot_pos))
  return jnp.concatenate(outs, axis=2), cache


def _check_caps(attn: Attention, cache: PlanCache, layout) -> None:
  if cache.caps != tuple(s + r for s, r in layout):
    raise ValueError(f"attention decode: layer {attn.layer}'s ring cache has slots {cache.caps} "
                     f"per KV head, but its plan at max_len {cache.max_len} needs {layout} "
                     f"(sink, ring) slots: the cache was made for another config")


def _plan_step(attn: Attention, q, k, v, pos, cache: PlanCache):
  """q [B, 1, H, K], k/v [B, 1, G, K] at position pos → (out [B, H, K], next PlanCache).

  Every query head scores every slot of the buffer (one einsum each for QKᵀ and PV), and slots
  of other KV heads are masked out: G times the FLOPs and the [B, H, slots] score memory of
  scoring each head's own slots, for a handful of kernels per layer instead of a handful per KV
  head. Decode attention reads each key once for H heads (~H FLOPs per byte), far under a
  GPU's ridge point, so the extra FLOPs cost no time where the step is memory- or launch-bound;
  the scores add ~3H/K of the KV bytes in traffic (fp32, written and read). For many KV heads
  with long spans (a near-dense MHA plan), the dense cache is the better layout.
  """
  cfg = attn.cfg
  dt = DTYPES[cfg.compute_dtype]
  mask = attn.mask(cache.max_len)
  layout = ring_layout(mask, cfg.n_heads, cfg.kv_heads, cache.max_len)
  _check_caps(attn, cache, layout)
  left, _, sink = head_rules(mask, cfg.n_heads)
  rep = cfg.n_heads // cfg.kv_heads
  pos = jnp.asarray(pos, jnp.int32)
  slots = []
  for g, (n_sink, n_ring) in enumerate(layout):
    start = cache.group(g).start
    if n_ring == 0:                      # every position is a sink (sink_h = max_len)
      slots.append(start + pos)
    else:
      slots.append(start + jnp.where(pos < n_sink, pos, n_sink + (pos - n_sink) % n_ring))
  slots = jnp.stack(slots)                                             # [G]: one slot per head
  kc = cache.k.at[:, slots].set(k[:, 0], unique_indices=True)
  vc = cache.v.at[:, slots].set(v[:, 0], unique_indices=True)
  sp = cache.slot_pos.at[slots].set(pos, unique_indices=True)
  group_of_slot = np.repeat(np.arange(cfg.kv_heads), cache.caps)       # [S], static
  own = group_of_slot[None, :] == (np.arange(cfg.n_heads) // rep)[:, None]
  sp_row = sp[None, :]
  vis = (own & (sp_row >= 0) & (sp_row <= pos)
         & ((pos - sp_row <= jnp.asarray(left)) | (sp_row < jnp.asarray(sink))))   # [H, S]
  scores = jnp.einsum("bhk,bsk->bhs", q[:, 0], kc,
                      preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
  scores = jnp.where(vis[None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhs,bsk->bhk", probs.astype(vc.dtype), vc,
                   preferred_element_type=jnp.float32).astype(dt)
  return out, dataclasses.replace(cache, k=kc, v=vc, slot_pos=sp)


# --- public API -------------------------------------------------------------------------------

def init_cache(attn: Attention, batch: int, max_len: int, *, full: bool = False,
               kv_quant: KVQuant | None = None, kv_evict: H2O | None = None):
  """Empty decode state: a PlanCache for sparse-plan layers, else (or with full=True) the dense
  {"k", "v": [B, max_len, G, K]} cache, or with kv_quant its quantized form (`QuantCache`), or
  with kv_evict, for a plain causal layer, an H2O cache of heavy + recent slots
  (`memx.nn.kv_evict.EvictCache`; windowed and sink layers keep the dense one)."""
  cfg = attn.cfg
  dt = DTYPES[cfg.compute_dtype]
  if kv_quant is not None and kv_evict is not None:
    raise ValueError("attention decode: kv_quant and kv_evict do not combine yet (an H2O cache "
                     "holds full-precision keys); choose one")
  if is_plan_layer(cfg, attn.layer) and not full:
    if kv_quant is not None:
      raise ValueError(f"attention decode: layer {attn.layer} follows a sparse plan and keeps "
                       f"per-head ring caches, which are not quantized; pass full_cache=True "
                       f"to give it a (quantized) dense cache, or no kv_quant")
    return _init_plan_cache(attn, batch, max_len)
  if kv_quant is not None:
    return init_quant_cache(kv_quant, batch, max_len, cfg.kv_heads, cfg.head_dim, dt)
  if kv_evict is not None and evicts(attn.mask(max_len)):
    return init_evict_cache(kv_evict, batch, max_len, cfg.kv_heads, cfg.head_dim, dt)
  shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def prefill(attn: Attention, x, max_len: int, *, full: bool = False,
            kv_quant: KVQuant | None = None, kv_evict: H2O | None = None):
  """The parallel forward over a prompt x [B, T, D] at positions 0..T-1 with the layer's mask
  at N = max_len, plus the decode state holding the prompt's keys/values (see init_cache)."""
  return extend(attn, x, 0, init_cache(attn, x.shape[0], max_len, full=full, kv_quant=kv_quant,
                                       kv_evict=kv_evict))


def _cache_max_len(cache) -> int:
  if isinstance(cache, (PlanCache, QuantCache, EvictCache)):
    return cache.max_len
  return cache["k"].shape[1]


def extend(attn: Attention, x, start, cache):
  """Continues a prefill by a chunk: x [B, C, D] at positions start..start+C-1, on a cache
  holding positions 0..start-1 → (y [B, C, D], the cache holding 0..start+C-1).

  The chunk's queries attend to the cached keys and their own (the mask at N = max_len, offset
  by start), so prefilling a prompt chunk by chunk equals prefilling it whole, while the
  activations scale with the chunk. With a static start (an int), a dense cache is read up to
  start + C by the attention kernels, a ring cache per KV head (`_held_in_order`), whose rings
  hold every key a chunk query can see. A traced start (inside a scan over chunks: one compiled
  chunk for any prompt length) needs a dense cache, read by `chunk_attention` (the offset read
  at run time: a Pallas kernel on GPUs). A quantized cache (`QuantCache`) is read as stored
  (dequantized, its residual exact) and the chunk's own keys at full precision; under a traced
  start its chunks must be whole key groups and start on a group boundary (as the chunks of
  `TransformerLM.prefill`'s scan do): a traced start off a boundary gives NaN outputs, never
  silently wrong ones.
  """
  cfg = attn.cfg
  dt = DTYPES[cfg.compute_dtype]
  b, c = x.shape[:2]
  max_len = _cache_max_len(cache)
  if not isinstance(start, jax.core.Tracer):
    start = int(start)   # a concrete offset (numpy or a 0-d array) is a static one
  static = isinstance(start, int)
  if static and (start < 0 or start + c > max_len):
    raise ValueError(f"attention extend: positions {start}..{start + c - 1} do not fit the "
                     f"cache of max_len {max_len}")
  if not static and isinstance(cache, PlanCache):
    raise ValueError("attention extend: a ring cache (sparse-plan layer) needs a static start "
                     "(its layout depends on it); unroll the chunks")
  whole_prompt = static and start == 0
  if isinstance(cache, EvictCache) and not whole_prompt and (cache.spec.observe
                                                             or cache.spec.pool > 1):
    raise ValueError(f"attention extend: {cache.spec.name}'s observation window and pooling "
                     f"score a whole prompt; prefill it at once, or chunk it without them")
  if not static and isinstance(cache, QuantCache) and c % cache.spec.group:
    raise ValueError(f"attention extend: a quantized cache under a traced start takes chunks "
                     f"of a multiple of its key group ({cache.spec.group} tokens), got {c}; "
                     f"use a static start (unroll) or another chunk size")
  q, k, v = attn.qkv(x, jnp.broadcast_to(start + jnp.arange(c), (b, c)))
  mask = attn.mask(max_len)
  if isinstance(cache, PlanCache):
    out, cache = _plan_extend(attn, q, k, v, start, cache, mask)
    return attn.out(out), cache
  if isinstance(cache, EvictCache):
    if whole_prompt:
      out = attention(q, k, v, mask=_prefix_mask(mask, c), implementation=cfg.attn_impl)
      observed, first = cache.spec.observed(q)
      cache = fill(cache, k, v, key_scores(observed, k, cfg.head_dim ** -0.5, first))
    else:  # a later chunk (or any chunk under a traced start): attend to what is held
      out, cache = evict_extend(cache, q, k, v, start, cfg.head_dim ** -0.5)
      out = out.astype(dt)
    return attn.out(out), cache
  if isinstance(cache, QuantCache):
    held = start % cache.spec.group if static else 0
    k_all, v_all = cache.read(cache.exact_from(start))
    cache = cache.append(k, v, start, held)
  else:
    cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], val, start, axis=1)
             for name, val in (("k", k), ("v", v))}
    k_all, v_all = cache["k"], cache["v"]
  if static:
    end = start + c
    keys = jnp.concatenate([k_all[:, :start], k], axis=1)   # the chunk's own keys as computed
    vals = jnp.concatenate([v_all[:, :start], v], axis=1)
    out = attention(q, keys, vals, mask=dataclasses.replace(_prefix_mask(mask, end),
                                                            q_offset=start),
                    implementation=cfg.attn_impl)
  else:
    k_all = jax.lax.dynamic_update_slice_in_dim(k_all[:, :max_len], k, start, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(v_all[:, :max_len], v, start, axis=1)
    # cuDNN cannot take a run-time offset: a config that asks for it gets the chunk dispatch.
    impl = None if cfg.attn_impl in (None, "cudnn") else cfg.attn_impl
    out = chunk_attention(q, k_all, v_all, start, mask=mask, implementation=impl)
    if isinstance(cache, QuantCache):  # appended as if start were on a boundary: say so
      out = jnp.where(start % cache.spec.group == 0, out, jnp.nan)
  return attn.out(out), cache


def _attend_step(attn: Attention, q, k_all, v_all, pos, max_len: int):
  """q [B, 1, H, K] at position pos over a dense cache k_all/v_all [B, S, G, K] (slot s holds
  position s; slots past pos are masked) with the layer's mask at N = max_len → [B, H, K]
  (a quantized cache: `memx.kernels.kv_quant.decode_attention`)."""
  dt = DTYPES[attn.cfg.compute_dtype]
  b = q.shape[0]
  s, g = k_all.shape[1:3]
  h = q.shape[2]
  q_gr = q[:, 0].reshape(b, g, h // g, q.shape[-1])                      # [B, G, R, K]
  scores = jnp.einsum("bgrk,bsgk->bgrs", q_gr, k_all,
                      preferred_element_type=jnp.float32) * attn.cfg.head_dim ** -0.5
  vis = visible(attn.mask(max_len), h, pos, jnp.arange(s)).reshape(g, h // g, s)
  scores = jnp.where(vis[None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrs,bsgk->bgrk", probs.astype(v_all.dtype), v_all,
                   preferred_element_type=jnp.float32).astype(dt)
  return out.reshape(b, -1, out.shape[-1])                               # [B, H, K]


def step(attn: Attention, x_t, pos, cache):
  """x_t [B, D] at position `pos` (scalar) → (y_t [B, D], cache with the new key/value)."""
  dt = DTYPES[attn.cfg.compute_dtype]
  b = x_t.shape[0]
  positions = jnp.full((b, 1), pos, jnp.int32)
  q, k, v = attn.qkv(x_t[:, None], positions)
  if isinstance(cache, PlanCache):
    out, cache = _plan_step(attn, q, k, v, pos, cache)
  elif isinstance(cache, QuantCache):
    cache = cache.step(k, v, pos)
    out = decode_attention(q[:, 0], cache, pos, mask=attn.mask(cache.max_len))
  elif isinstance(cache, EvictCache):
    out, cache = evict_step(cache, q[:, 0], k[:, 0], v[:, 0], pos, attn.cfg.head_dim ** -0.5)
    out = out.astype(dt)
  else:
    cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, pos, axis=1),
             "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, pos, axis=1)}
    out = _attend_step(attn, q, cache["k"], cache["v"], pos, cache["k"].shape[1])
  return attn.out(out), cache


def kv_cache_bytes(cfg: ModelConfig, max_len: int, batch: int = 1, *, full: bool = False,
                   include_positions: bool = False, kv_quant: KVQuant | None = None,
                   kv_evict: H2O | None = None) -> int:
  """Exact bytes of the keys and values a model's decode state holds for `batch` sequences of
  up to max_len tokens, over its attention layers (SSM/linear-attention states not included).

  Sparse-plan layers hold sum_g (S_g + R_g) slots per sequence (`ring_layout` at N = max_len),
  other attention layers (and all of them with full=True) G · max_len; each slot is a key and a
  value of head_dim numbers in the compute dtype. include_positions adds the ring caches' int32
  slot positions (one per slot, shared by the batch). With kv_quant, the dense caches are
  quantized: codes, scales and zeros, and the full-precision residual (`quant_cache_bytes`).
  With kv_evict, plain causal layers hold H2O's heavy + recent slots, each with its int32
  position and float32 score (`evict_cache_bytes`).
  Equals the summed nbytes of those arrays in `TransformerLM.init_cache(batch, max_len,
  kv_quant=...)`; per token of context: this / max_len.
  """
  if max_len <= 0 or batch <= 0:
    raise ValueError(f"kv_cache_bytes: max_len = {max_len} and batch = {batch} must be >= 1")
  item = jnp.dtype(DTYPES[cfg.compute_dtype]).itemsize
  total = 0
  for layer in range(cfg.n_layers):
    if cfg.mixer(layer) != "attention":
      continue
    if is_plan_layer(cfg, layer) and not full:
      if kv_quant is not None:
        raise ValueError(f"kv_cache_bytes: layer {layer} follows a sparse plan, whose ring "
                         f"caches are not quantized; pass full=True or no kv_quant")
      mask = layer_mask(cfg, layer, max_len)
      slots = sum(s + r for s, r in ring_layout(mask, cfg.n_heads, cfg.kv_heads, max_len))
      total += 2 * batch * slots * cfg.head_dim * item
      if include_positions:
        total += slots * 4
    elif kv_quant is not None:
      total += quant_cache_bytes(kv_quant, batch, max_len, cfg.kv_heads, cfg.head_dim, item)
    elif kv_evict is not None and evicts(layer_mask(cfg, layer, max_len)):
      total += evict_cache_bytes(kv_evict, batch, max_len, cfg.kv_heads, cfg.head_dim, item)
    else:
      total += 2 * batch * max_len * cfg.kv_heads * cfg.head_dim * item
  return total
