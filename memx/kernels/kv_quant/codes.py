"""KIVI's quantization of keys and values: `KVQuant` (bits, group), b-bit codes packed planar
into bytes, asymmetric per-group quantize / dequantize (keys per channel over token groups,
values per token over channel groups). The format and its rationale: package docstring."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class KVQuant:
  """How attention layers store keys and values for decoding: `bits` per number (2, 4 or 8),
  keys quantized over groups of `group` tokens per channel, values over groups of
  min(group, head_dim) channels per token; the `residual` most recent whole groups' tokens (a
  multiple of group; KIVI's R, e.g. 128) stay at full precision besides the current group."""

  bits: int = 4
  group: int = 32
  residual: int = 0

  def __post_init__(self):
    if self.bits not in BITS:
      raise ValueError(f"KVQuant: bits must be one of {BITS}, got {self.bits!r}")
    if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 2:
      raise ValueError(f"KVQuant: group (tokens per key group) must be an int >= 2, got "
                       f"{self.group!r}")
    if not isinstance(self.residual, int) or isinstance(self.residual, bool) \
        or self.residual < 0 or self.residual % self.group:
      raise ValueError(f"KVQuant: residual (full-precision tokens besides the current group) "
                       f"must be an int >= 0 and a multiple of group {self.group}, got "
                       f"{self.residual!r}")

  @property
  def ring(self) -> int:
    """Slots of the full-precision ring: the residual plus the current group."""
    return self.residual + self.group

  def exact_from(self, pos):
    """The first position a read at `pos` (int or traced) takes at full precision:
    max(0, group · floor(pos / group) - residual); earlier ones are read from the codes."""
    first = pos // self.group * self.group - self.residual
    return max(first, 0) if isinstance(first, int) else jnp.maximum(first, 0)

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
    """'4', '4:32' or '2:32:128' (bits[:group[:residual]]) → KVQuant; the CLI's spelling."""
    parts = str(text).split(":")
    try:
      if not 1 <= len(parts) <= 3:
        raise TypeError
      values = [int(x) for x in parts]
    except (TypeError, ValueError):
      raise ValueError(f"KVQuant: expected BITS, BITS:GROUP or BITS:GROUP:RESIDUAL (e.g. 4, "
                       f"2:32 or 2:32:128), got {text!r}") from None
    return cls(**dict(zip(("bits", "group", "residual"), values, strict=False)))

  @property
  def name(self) -> str:
    """kv{bits}g{group}[r{residual}]: the evaluation name."""
    return f"kv{self.bits}g{self.group}" + (f"r{self.residual}" if self.residual else "")


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


def _round_toward(x, dtype, direction):
  """float32 x in `dtype`, rounded toward `direction` (±inf) where the cast rounded the other
  way: a stored zero never exceeds its group's minimum, a stored scale never falls short."""
  y = x.astype(dtype)
  wrong = y.astype(jnp.float32) < x if direction > 0 else y.astype(jnp.float32) > x
  return jnp.where(wrong, jnp.nextafter(y, jnp.asarray(direction, dtype)), y)


def quantize(x, bits: int, axis: int, dtype):
  """Asymmetric b-bit quantization of x over `axis` (one group per position of the other
  axes) → (uint8 codes shaped like x, scale, zero with `axis` removed, in `dtype`).

  zero and scale are stored in `dtype` rounded outward (zero down to at most the minimum, scale
  up so that the grid still reaches the maximum), and the codes are computed from the stored
  values: every code lies in range unclipped, and dequantize's error is at most scale / 2 (plus
  the rounding of its own result to the output dtype). A constant group gets scale 0 and is
  stored exactly when its value is representable in `dtype`.
  """
  xf = x.astype(jnp.float32)
  lo, hi = jnp.min(xf, axis=axis), jnp.max(xf, axis=axis)
  zero = _round_toward(lo, dtype, -jnp.inf)
  scale = _round_toward((hi - zero.astype(jnp.float32)) / (2 ** bits - 1), dtype, jnp.inf)
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
