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

  def read(self, group_start):
    """Keys and values [B, L, Hkv, K] in the compute dtype: every slot dequantized, then the
    residual written over the slots from group_start (G · floor(pos / G); static or traced)."""
    spec, dt = self.spec, self.dtype
    k = dequantize_keys(self.k_codes, self.k_scale, self.k_zero, spec, dt)
    v = dequantize_values(self.v_codes, self.v_scale, self.v_zero, spec, dt)
    return (jax.lax.dynamic_update_slice_in_dim(k, self.k_res, group_start, 1),
            jax.lax.dynamic_update_slice_in_dim(v, self.v_res, group_start, 1))

  def append(self, k, v, start, held: int) -> QuantCache:
    """Writes k, v [B, C, Hkv, K] of positions start..start+C-1. `held` (static) = start mod G,
    the residual's tokens already there; every group this completes is quantized into the codes,
    the rest becomes the residual. start may be traced only with held = 0."""
    spec = self.spec
    g = spec.group
    if held:
      k = jnp.concatenate([self.k_res[:, :held], k], axis=1)
      v = jnp.concatenate([self.v_res[:, :held], v], axis=1)
    first = (start - held) // g                       # the group position start - held opens
    n_full = k.shape[1] // g
    out = {}
    if n_full:
      kq = quantize_keys(k[:, :n_full * g], spec, self.dtype)
      vq = quantize_values(v[:, :n_full * g], spec, self.dtype)
      for name, val, at in zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"),
                               kq + vq, (g, 1, 1, g, g, g), strict=True):
        out[name] = jax.lax.dynamic_update_slice_in_dim(getattr(self, name), val,
                                                        first * at, 1)
    tail = k.shape[1] - n_full * g
    if tail:
      out["k_res"] = self.k_res.at[:, :tail].set(k[:, n_full * g:])
      out["v_res"] = self.v_res.at[:, :tail].set(v[:, n_full * g:])
    return dataclasses.replace(self, **out)

  def step(self, k, v, pos) -> QuantCache:
    """Writes one position's k, v [B, 1, Hkv, K] (pos traced): into the residual, and when it
    completes its group, the group into the codes (computed every step, written only then:
    G · Hkv · K numbers, nothing next to the attention)."""
    spec, g = self.spec, self.spec.group
    slot, grp = pos % g, pos // g
    k_res = jax.lax.dynamic_update_slice_in_dim(self.k_res, k, slot, 1)
    v_res = jax.lax.dynamic_update_slice_in_dim(self.v_res, v, slot, 1)
    done = slot == g - 1
    new = dict(zip(("k_codes", "k_scale", "k_zero"), quantize_keys(k_res, spec, self.dtype),
                   strict=True))
    new |= dict(zip(("v_codes", "v_scale", "v_zero"), quantize_values(v_res, spec, self.dtype),
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
  res = lambda: jnp.zeros((batch, spec.group, kv_heads, head_dim), dtype)  # noqa: E731
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
  res = 2 * spec.group * head_dim * itemsize
  return batch * kv_heads * (codes + k_stats + v_stats + res)
