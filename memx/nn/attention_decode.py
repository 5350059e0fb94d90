"""KV-cache decoding for `memx.nn.attention.Attention`: prefill and one-token steps.

The cache is preallocated to max_len ([B, max_len, G, K] keys and values); a step writes the new
key/value at its position and attends over the cache with the layer's causal/window/sink mask
(fp32 softmax, as the kernels do).
"""

import jax
import jax.numpy as jnp

from memx.kernels.attention import Mask, attention
from memx.kernels.attention.reference import MASK_VALUE
from memx.nn._params import DTYPES
from memx.nn.attention import Attention
from memx.nn.rope import apply_rope


def _qkv(attn: Attention, x, positions):
  dt = DTYPES[attn.cfg.compute_dtype]
  q = jnp.einsum("btd,dhk->bthk", x, attn.wq[...].astype(dt))
  k = jnp.einsum("btd,dgk->btgk", x, attn.wk[...].astype(dt))
  v = jnp.einsum("btd,dgk->btgk", x, attn.wv[...].astype(dt))
  q = apply_rope(q, positions, theta=attn.cfg.rope_theta)
  k = apply_rope(k, positions, theta=attn.cfg.rope_theta)
  return q, k, v


def _visible(mask: Mask, q_pos, k_pos):
  """Which cache positions a query at q_pos sees (head-uniform causal/window/sink masks)."""
  if mask.num_heads is not None or mask.block_sparse is not None or mask.q_offset:
    raise NotImplementedError("attention decode: per-head, block-sparse or offset masks are "
                              "not supported by the KV-cache step")
  ok = jnp.ones_like(k_pos, bool)
  if mask.causal:
    ok &= k_pos <= q_pos
  in_window = jnp.ones_like(k_pos, bool)
  if mask.window_left is not None:
    in_window &= q_pos - k_pos <= mask.window_left
  if mask.window_right is not None:
    in_window &= k_pos - q_pos <= mask.window_right
  if mask.n_sink:
    in_window |= k_pos < mask.n_sink
  return ok & in_window


def init_cache(attn: Attention, batch: int, max_len: int) -> dict[str, jax.Array]:
  cfg = attn.cfg
  shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
  dt = DTYPES[cfg.compute_dtype]
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def prefill(attn: Attention, x, positions, max_len: int):
  """The parallel forward of `Attention.__call__` plus a cache holding the prompt's keys/values."""
  dt = DTYPES[attn.cfg.compute_dtype]
  q, k, v = _qkv(attn, x, positions)
  out = attention(q, k, v, mask=attn.mask, implementation=attn.cfg.attn_impl)
  out = jnp.einsum("bthk,hkd->btd", out, attn.wo[...].astype(dt))
  cache = init_cache(attn, x.shape[0], max_len)
  cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], val, 0, axis=1)
           for name, val in (("k", k), ("v", v))}
  return out, cache


def step(attn: Attention, x_t, pos, cache):
  """x_t [B, D] at position `pos` (scalar) → (y_t [B, D], cache with the new key/value)."""
  dt = DTYPES[attn.cfg.compute_dtype]
  b = x_t.shape[0]
  positions = jnp.full((b, 1), pos, jnp.int32)
  q, k, v = _qkv(attn, x_t[:, None], positions)
  cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, pos, axis=1),
           "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, pos, axis=1)}
  g = cache["k"].shape[2]
  q_gr = q[:, 0].reshape(b, g, -1, q.shape[-1])                          # [B, G, R, K]
  scores = jnp.einsum("bgrk,bsgk->bgrs", q_gr, cache["k"],
                      preferred_element_type=jnp.float32) * attn.cfg.head_dim ** -0.5
  vis = _visible(attn.mask, pos, jnp.arange(cache["k"].shape[1]))
  scores = jnp.where(vis[None, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrs,bsgk->bgrk", probs.astype(cache["v"].dtype), cache["v"],
                   preferred_element_type=jnp.float32).astype(dt)
  out = out.reshape(b, -1, out.shape[-1])                                # [B, H, K]
  return jnp.einsum("bhk,hkd->bd", out, attn.wo[...].astype(dt)), cache
