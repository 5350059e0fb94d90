"""`QuantCache`: one attention layer's quantized decode state (layout: package docstring)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from memx.kernels.kv_quant.codes import (
  KVQuant,
  dequantize_keys,
  dequantize_values,
  quantize_keys,
  quantize_values,
)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero",
                                "k_res", "v_res"),
                   meta_fields=("spec", "max_len"))
@dataclasses.dataclass(frozen=True)
class QuantCache:
  """One attention layer's quantized decode state (layout in the package docstring)."""

  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  k_res: jax.Array
  v_res: jax.Array
  spec: KVQuant
  max_len: int

  @property
  def dtype(self):
    return self.k_res.dtype

  def exact_from(self, pos):
    return self.spec.exact_from(pos)

  def ring_positions(self, exact_from):
    """The position each ring slot holds for a read from exact_from: [ring] int, covering
    exact_from .. exact_from + ring - 1 (slots past the last written position hold older,
    unreachable ones: causally masked)."""
    ring = self.spec.ring
    return exact_from + (jnp.arange(ring) - exact_from) % ring

  def read(self, exact_from):
    """Keys and values [B, L, Hkv, K] in the compute dtype: every slot dequantized, then the
    ring written over positions exact_from .. (`exact_from(pos)` of the reading position)."""
    spec, dt = self.spec, self.dtype
    k = dequantize_keys(self.k_codes, self.k_scale, self.k_zero, spec, dt)
    v = dequantize_values(self.v_codes, self.v_scale, self.v_zero, spec, dt)
    at = self.ring_positions(exact_from)
    return (k.at[:, at].set(self.k_res, mode="drop", unique_indices=True),
            v.at[:, at].set(self.v_res, mode="drop", unique_indices=True))

  def append(self, k, v, start, held: int) -> QuantCache:
    """Writes k, v [B, C, Hkv, K] of positions start..start+C-1. `held` (static) = start mod G.
    The ring's tokens from G·floor(start / G) - residual on join the chunk; every group that
    leaves the full-precision window (ends before G·floor((start + C) / G) - residual) is
    quantized into the codes, and the chunk's last tokens go into the ring. start may be
    traced only with held = 0."""
    spec, g, ring = self.spec, self.spec.group, self.spec.ring
    c = k.shape[1]
    lead = spec.residual + held                      # ring tokens before the chunk that join it
    first = start - lead                             # a group boundary; < 0 near the start
    if lead:
      slots = (first + jnp.arange(lead)) % ring
      k_win = jnp.concatenate([self.k_res[:, slots], k], axis=1)
      v_win = jnp.concatenate([self.v_res[:, slots], v], axis=1)
    else:
      k_win, v_win = k, v
    n_q = (held + c) // g                            # groups leaving the window
    out = {}
    if n_q:
      kq = quantize_keys(k_win[:, :n_q * g], spec, self.dtype)
      vq = quantize_values(v_win[:, :n_q * g], spec, self.dtype)
      tok = first + jnp.arange(n_q * g)
      grp = first // g + jnp.arange(n_q)
      # Groups before position 0 (a ring not yet full) are dropped: out-of-range indices.
      tok = jnp.where(tok >= 0, tok, self.k_codes.shape[1])
      grp = jnp.where(grp >= 0, grp, self.k_scale.shape[1])
      for name, val, idx in zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"),
                                kq + vq, (tok, grp, grp, tok, tok, tok), strict=True):
        out[name] = getattr(self, name).at[:, idx].set(val, mode="drop")
    m = min(c, ring)
    slots = (start + c - m + jnp.arange(m)) % ring
    out["k_res"] = self.k_res.at[:, slots].set(k[:, c - m:], unique_indices=True)
    out["v_res"] = self.v_res.at[:, slots].set(v[:, c - m:], unique_indices=True)
    return dataclasses.replace(self, **out)

  def step(self, k, v, pos) -> QuantCache:
    """Writes one position's k, v [B, 1, Hkv, K] (pos traced) into the ring; when it completes
    its group, the group that leaves the full-precision window (residual / G groups back) is
    quantized into the codes (computed every step, written only then: G · Hkv · K numbers,
    nothing next to the attention)."""
    spec, g, ring = self.spec, self.spec.group, self.spec.ring
    k_res = jax.lax.dynamic_update_slice_in_dim(self.k_res, k, pos % ring, 1)
    v_res = jax.lax.dynamic_update_slice_in_dim(self.v_res, v, pos % ring, 1)
    leaving = pos // g - spec.residual // g
    done = (pos % g == g - 1) & (leaving >= 0)
    grp = jnp.maximum(leaving, 0)
    k_grp = jax.lax.dynamic_slice_in_dim(k_res, grp * g % ring, g, 1)   # contiguous: ring % g = 0
    v_grp = jax.lax.dynamic_slice_in_dim(v_res, grp * g % ring, g, 1)
    new = dict(zip(("k_codes", "k_scale", "k_zero"), quantize_keys(k_grp, spec, self.dtype),
                   strict=True))
    new |= dict(zip(("v_codes", "v_scale", "v_zero"), quantize_values(v_grp, spec, self.dtype),
                    strict=True))
    out = {"k_res": k_res, "v_res": v_res}
    for name, val in new.items():
      at = grp if name in ("k_scale", "k_zero") else grp * g
      old = jax.lax.dynamic_slice_in_dim(getattr(self, name), at, val.shape[1], 1)
      out[name] = jax.lax.dynamic_update_slice_in_dim(getattr(self, name),
                                                      jnp.where(done, val, old), at, 1)
    return dataclasses.replace(self, **out)


def init_quant_cache(spec: KVQuant, batch: int, max_len: int, kv_heads: int, head_dim: int,
                     dtype) -> QuantCache:
  """An empty QuantCache (all codes 0, scales 0: every slot reads as 0 until written)."""
  spec.check(head_dim)
  slots = math.ceil(max_len / spec.group) * spec.group
  width = head_dim * spec.bits // 8
  n_vg = head_dim // spec.value_group(head_dim)
  # One array per field (none shared: a cache passed to a jit with donation donates each).
  codes = lambda: jnp.zeros((batch, slots, kv_heads, width), jnp.uint8)  # noqa: E731
  k_stats = lambda: jnp.zeros((batch, slots // spec.group, kv_heads, head_dim), dtype)  # noqa: E731
  v_stats = lambda: jnp.zeros((batch, slots, kv_heads, n_vg), dtype)  # noqa: E731
  res = lambda: jnp.zeros((batch, spec.ring, kv_heads, head_dim), dtype)  # noqa: E731
  return QuantCache(k_codes=codes(), k_scale=k_stats(), k_zero=k_stats(), v_codes=codes(),
                    v_scale=v_stats(), v_zero=v_stats(), k_res=res(), v_res=res(), spec=spec,
                    max_len=max_len)


def quant_cache_bytes(spec: KVQuant, batch: int, max_len: int, kv_heads: int, head_dim: int,
                      itemsize: int) -> int:
  """Exact bytes of `init_quant_cache(...)`'s arrays (scales and residual at `itemsize`)."""
  spec.check(head_dim)
  slots = math.ceil(max_len / spec.group) * spec.group
  codes = 2 * slots * head_dim * spec.bits // 8
  k_stats = 2 * (slots // spec.group) * head_dim * itemsize
  v_stats = 2 * slots * (head_dim // spec.value_group(head_dim)) * itemsize
  res = 2 * spec.ring * head_dim * itemsize
  return batch * kv_heads * (codes + k_stats + v_stats + res)
