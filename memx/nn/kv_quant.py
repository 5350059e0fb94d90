"""Quantized KV caches for decoding (KIVI): keys per channel, values per token, in b-bit codes.

KIVI (Liu et al., 2024) finds that keys have outlier channels (a few channels are large for
every token) while values do not, so it quantizes keys per channel, over groups of G
consecutive tokens, and values per token, over groups of consecutive channels; both
asymmetric (x̂ = code · scale + zero, zero = the group's minimum, scale = its range / (2^b - 1),
so |x - x̂| <= scale / 2), tuning-free, at 2 or 4 bits. Keys of a group can only be quantized
once the group's G tokens exist, so the newest (incomplete) group stays in full precision: the
residual.

`QuantCache`, one attention layer's cache for max_len tokens, L = ceil(max_len / G) · G slots:
  k_codes, v_codes   uint8 [B, L, Hkv, W], W = K · bits / 8: 8 / bits codes per byte, planar
                     (channel f · W + j in byte j at bit f · bits: `pack`)
  k_scale, k_zero    [B, L / G, Hkv, K]: per token group and channel (compute dtype)
  v_scale, v_zero    [B, L, Hkv, K / Gv]: per token and channel group, Gv = min(G, K)
  k_res, v_res       [B, G, Hkv, K]: the newest group's keys and values in full precision

What a read sees. Positions before the current group (G · floor(pos / G)) are read
dequantized; the current group's, up to pos, exactly as computed. A decode step writes its
key/value into the residual first, so it reads its own group, itself included, at full
precision; when the step completes a group (pos mod G = G - 1) the group is quantized into the
codes, and later steps read it from there. A prefill chunk attends to its own keys at full
precision and to what earlier chunks left in the cache as stored: so a prompt prefilled whole
sees itself exactly (as KIVI's prefill does) and only generated tokens read quantized keys.

`QuantCache.read` dequantizes the whole layer into the compute dtype (one layer's
full-precision keys and values as a temporary) and the attention runs as on a dense cache: the
stored bytes, which is what limits batch and context, are the quantized ones
(`quant_cache_bytes`). A fused kernel that dequantizes in registers would also cut the decode
step's HBM reads; that is not built.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class KVQuant:
  """How attention layers store keys and values for decoding: `bits` per number (2, 4 or 8),
  keys quantized over groups of `group` tokens per channel, values over groups of
  min(group, head_dim) channels per token."""

  bits: int = 4
  group: int = 32

  def __post_init__(self):
    if self.bits not in BITS:
      raise ValueError(f"KVQuant: bits must be one of {BITS}, got {self.bits!r}")
    if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 2:
      raise ValueError(f"KVQuant: group (tokens per key group) must be an int >= 2, got "
                       f"{self.group!r}")

  def value_group(self, head_dim: int) -> int:
    return min(self.group, head_dim)

  def check(self, head_dim: int) -> None:
    """Refuses a head_dim the format cannot store (before any array is made)."""
    per_byte = 8 // self.bits
    vg = self.value_group(head_dim)
    if head_dim % per_byte or head_dim % vg:
      raise ValueError(f"KVQuant(bits={self.bits}, group={self.group}): head_dim {head_dim} "
                       f"must be a multiple of {per_byte} (codes per byte) and of the value "
                       f"group {vg}")

  @classmethod
  def parse(cls, text: str) -> KVQuant:
    """'4' or '4:32' (bits[:group]) → KVQuant; the CLI's spelling."""
    bits, _, group = str(text).partition(":")
    try:
      return cls(bits=int(bits), group=int(group) if group else cls.group)
    except ValueError as e:
      if "KVQuant" in str(e):
        raise
      raise ValueError(f"KVQuant: expected BITS or BITS:GROUP (e.g. 4 or 2:32), got "
                       f"{text!r}") from None


# --- codes ------------------------------------------------------------------------------------

def _shifts(bits: int, ndim: int):
  """Each field's bit offset in its byte, on axis -2 of an `ndim`-axis array."""
  return (jnp.arange(8 // bits, dtype=jnp.uint8) * bits).reshape((1,) * (ndim - 2) + (-1, 1))


def pack(codes, bits: int):
  """uint8 codes [..., K] in [0, 2^bits) → bytes [..., W], W = K · bits / 8, planar: field f
  (bits f·bits ..) of byte j holds channel f · W + j, so each field of a row of bytes is a
  contiguous run of W channels (a kernel unpacks field by field without reshaping)."""
  if bits == 8:
    return codes.astype(jnp.uint8)
  per = 8 // bits
  fields = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], per, -1)
  # Distinct bit fields: the sum is their bitwise or.
  return jnp.sum(fields << _shifts(bits, fields.ndim), axis=-2, dtype=jnp.uint8)


def unpack(packed, bits: int):
  """bytes [..., K · bits / 8] → uint8 codes [..., K]."""
  if bits == 8:
    return packed
  fields = (packed[..., None, :] >> _shifts(bits, packed.ndim + 1)) & jnp.uint8(2 ** bits - 1)
  return fields.reshape(*packed.shape[:-1], -1)


def quantize(x, bits: int, axis: int, dtype):
  """Asymmetric b-bit quantization of x over `axis` (one group per position of the other
  axes) → (uint8 codes shaped like x, scale, zero with `axis` removed, in `dtype`).

  scale and zero are rounded to `dtype` first and the codes computed from the rounded values,
  so dequantize's error is the rounding of x to the grid (at most scale / 2) and nothing else.
  A constant group gets scale 0 and is stored exactly.
  """
  xf = x.astype(jnp.float32)
  lo, hi = jnp.min(xf, axis=axis), jnp.max(xf, axis=axis)
  zero = lo.astype(dtype)
  scale = ((hi - lo) / (2 ** bits - 1)).astype(dtype)
  z, s = (jnp.expand_dims(a.astype(jnp.float32), axis) for a in (zero, scale))
  codes = jnp.round((xf - z) / jnp.where(s > 0, s, 1.0))
  return jnp.clip(codes, 0, 2 ** bits - 1).astype(jnp.uint8), scale, zero


def dequantize(codes, scale, zero, axis: int, dtype):
  """codes · scale + zero, scale and zero broadcast over `axis`, in `dtype`."""
  s, z = (jnp.expand_dims(a.astype(jnp.float32), axis) for a in (scale, zero))
  return (codes.astype(jnp.float32) * s + z).astype(dtype)


def quantize_keys(k, spec: KVQuant, dtype):
  """Keys [B, n · G, Hkv, K] → (codes [B, n · G, Hkv, K · b / 8], scale and zero [B, n, Hkv, K])."""
  b, t, g, d = k.shape
  grouped = k.reshape(b, t // spec.group, spec.group, g, d)
  codes, scale, zero = quantize(grouped, spec.bits, 2, dtype)
  return pack(codes.reshape(k.shape), spec.bits), scale, zero


def dequantize_keys(packed, scale, zero, spec: KVQuant, dtype):
  b, t, g = packed.shape[:3]
  codes = unpack(packed, spec.bits).reshape(b, t // spec.group, spec.group, g, -1)
  return dequantize(codes, scale, zero, 2, dtype).reshape(b, t, g, -1)


def quantize_values(v, spec: KVQuant, dtype):
  """Values [B, T, Hkv, K] → (codes [B, T, Hkv, K · b / 8], scale and zero [B, T, Hkv, K / Gv])."""
  vg = spec.value_group(v.shape[-1])
  grouped = v.reshape(*v.shape[:-1], -1, vg)
  codes, scale, zero = quantize(grouped, spec.bits, 4, dtype)
  return pack(codes.reshape(v.shape), spec.bits), scale, zero


def dequantize_values(packed, scale, zero, spec: KVQuant, dtype):
  codes = unpack(packed, spec.bits)
  vg = spec.value_group(codes.shape[-1])
  grouped = codes.reshape(*codes.shape[:-1], -1, vg)
  return dequantize(grouped, scale, zero, 4, dtype).reshape(codes.shape)


# --- the cache --------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero",
                                "k_res", "v_res"),
                   meta_fields=("spec", "max_len"))
@dataclasses.dataclass(frozen=True)
class QuantCache:
  """One attention layer's quantized decode state (layout in the module docstring)."""

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
  codes = jnp.zeros((batch, slots, kv_heads, width), jnp.uint8)
  k_stats = jnp.zeros((batch, slots // spec.group, kv_heads, head_dim), dtype)
  v_stats = jnp.zeros((batch, slots, kv_heads, n_vg), dtype)
  res = jnp.zeros((batch, spec.group, kv_heads, head_dim), dtype)
  return QuantCache(k_codes=codes, k_scale=k_stats, k_zero=k_stats, v_codes=codes,
                    v_scale=v_stats, v_zero=v_stats, k_res=res, v_res=res, spec=spec,
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
