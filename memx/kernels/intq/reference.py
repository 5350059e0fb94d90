"""Group-wise affine integer weights, as GPTQ and round-to-nearest (RTN) post-training
quantization store them: the group parameters, RTN, packing along K, storage cost and the
dequantize-then-dot oracle of the matmul.

A weight W [K, N] (used as x @ W, K the contraction dim) is split into groups of `group_size`
consecutive rows of one column. Group b of column n has a float32 scale s[b, n] > 0 and an
integer zero point z[b, n] in [0, 2^bits − 1] (stored as float32), and each weight a code

  code[k, n] = clip(round(W[k, n] / s) + z, 0, 2^bits − 1)     (b = k // group_size)
  W̃[k, n]    = (code[k, n] − z) · s

with bits in {2, 3, 4, 8}; `round` is round-half-to-even (NumPy's and JAX's).

Group parameters (`group_params`), from the group's min and max, asymmetric min/max:

  lo = min(wmin, 0), hi = max(wmax, 0)
  s  = (hi − lo) / (2^bits − 1),  z = clip(round(−lo / s), 0, 2^bits − 1)

The range is widened to hold 0, as GPTQ's reference quantizer does (Frantar et al. 2023, their
`Quantizer.find_params`): the grid (c − z)·s, c in [0, 2^bits − 1], always holds 0 because z is
an integer in range, so a group whose values all have one sign would otherwise be clipped far
outside its range (e.g. [10, 11] at 2 bits: z = round(−30) clips to 0 and every code to 3,
W̃ = 1). With the widened range every weight is within s/2 of its W̃, exact zeros stay exact,
and for a group that holds both signs (or a zero) it is exactly the plain min/max rule. A
constant group (wmin = wmax = c) would get s = 0 (c = 0) or an s whose rounding may miss c; it
gets s = |c| (1 for c = 0) instead, so c dequantizes exactly: c > 0 is code 1 with z = 0, c < 0
code 0 with z = 1.

Packing along K (`pack`, `unpack`): codes go into containers of 2 bits (bits = 2: four codes per
byte), 4 bits (bits = 3 and 4: two per byte) or 8 bits (one per byte), uint8 [K · container / 8,
N]. Byte j of a column holds rows per·j + i (per = codes per byte) at bits [i · container,
(i + 1) · container): the lowest bits hold the lowest row. 3-bit codes are computed exactly as
3-bit (values in [0, 8)) but stored in 4-bit containers: 4 bits per weight, not 3 (a dense
3-bit layout would split codes across bytes; this package trades the 1 bit for a decode that
is one shift and one mask).

The base is frozen: the matmul is differentiable with respect to x only; codes are integers and
scales and zeros get no gradient in any implementation (the reference stops them, so every
implementation computes the same function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memx.typing import Array, Float, Int

BITS = (2, 3, 4, 8)
_CONTAINER = {2: 2, 3: 4, 4: 4, 8: 8}  # bits of storage per code


def container_bits(bits: int) -> int:
  """Bits of storage per code: 2, 4, 4, 8 for bits = 2, 3, 4, 8."""
  return _CONTAINER[bits]


def codes_per_byte(bits: int) -> int:
  """4, 2, 2, 1 for bits = 2, 3, 4, 8."""
  return 8 // _CONTAINER[bits]


def max_code(bits: int) -> int:
  return (1 << bits) - 1


# --- checks ---------------------------------------------------------------------------------


def _shape(a) -> tuple | None:
  s = getattr(a, "shape", None)
  return None if s is None else tuple(s)


def _is_int(v) -> bool:
  return isinstance(v, int | np.integer) and not isinstance(v, bool)


def check_bits(op: str, bits) -> None:
  if not _is_int(bits) or int(bits) not in BITS:
    raise ValueError(f"{op}: bits = {bits!r} is not allowed: it must be one of 2, 3, 4, 8")


def check_group_size(op: str, group_size, bits: int | None = None) -> None:
  """group_size: an int >= 1; with bits, also a multiple of the codes per byte (the rows of one
  byte must share a group)."""
  if not _is_int(group_size) or group_size < 1:
    raise ValueError(f"{op}: group_size = {group_size!r} is not allowed: it must be an int >= 1")
  if bits is not None and group_size % codes_per_byte(bits):
    per = codes_per_byte(bits)
    raise ValueError(f"{op}: group_size = {group_size} is not allowed for bits = {bits}: it must "
                     f"be a multiple of {per}, the codes per byte (a byte's rows must share one "
                     f"group)")


def check_k(op: str, k: int, group_size: int) -> None:
  """K > 0 and a multiple of group_size."""
  if k <= 0:
    raise ValueError(f"{op}: K = {k} rows: the weight is empty")
  if k % group_size:
    raise ValueError(f"{op}: K = {k} is not a multiple of group_size = {group_size}; allowed: K "
                     f"a multiple of group_size (pad W with zero rows and x with zero columns to "
                     f"{-(-k // group_size) * group_size})")


def _first_bad(op: str, a, bad, what: str) -> None:
  """Raises ValueError naming the first element where bad(a) holds, when a is concrete (a traced
  a cannot be checked: the caller promised valid values)."""
  if isinstance(a, jax.core.Tracer):
    return
  mask = bad(a)
  if not bool(jnp.any(mask)):
    return
  arr, mask = np.asarray(a), np.asarray(mask)
  idx = tuple(int(i) for i in np.argwhere(mask)[0])
  raise ValueError(f"{op}: {what}; found {arr[idx]!r} at index {idx} ({int(mask.sum())} bad "
                   f"entries)")


def _check_w(op: str, w) -> None:
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{op}: w must be [K, N] (used as x @ w); got shape {_shape(w)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{op}: w must be floating point; got {w.dtype}")


def check_params(op: str, scales, zeros, k: int, n: int, group_size: int) -> None:
  """scales and zeros float32 [K/group_size, N]."""
  want = (k // group_size, n)
  for name, a in (("scales", scales), ("zeros", zeros)):
    if getattr(a, "ndim", None) != 2:
      raise ValueError(f"{op}: {name} must be [K/group_size, N] = {list(want)}; got shape "
                       f"{_shape(a)}")
    if a.dtype != jnp.float32:
      raise ValueError(f"{op}: {name} must be float32 (quantize_rtn's output); got {a.dtype}")
    if tuple(a.shape) != want:
      raise ValueError(f"{op}: a weight of K = {k} rows and N = {n} columns in groups of "
                       f"group_size = {group_size} needs {name} of shape [K/group_size, N] = "
                       f"{list(want)}; got {list(a.shape)}")


def check_packed(op: str, packed, scales, zeros, bits, group_size) -> tuple[int, int]:
  """packed uint8 [K · container / 8, N] with its scales and zeros: returns (K, N)."""
  check_bits(op, bits)
  check_group_size(op, group_size, bits)
  if getattr(packed, "ndim", None) != 2:
    raise ValueError(f"{op}: packed must be [K·{container_bits(bits)}/8, N] (pack's output); got "
                     f"shape {_shape(packed)}")
  if packed.dtype != jnp.uint8:
    raise ValueError(f"{op}: packed must be uint8 (pack's output); got {packed.dtype}")
  k, n = codes_per_byte(bits) * packed.shape[0], packed.shape[1]
  check_k(op, k, group_size)
  check_params(op, scales, zeros, k, n, group_size)
  return k, n


# --- group parameters and quantization ------------------------------------------------------


def group_params(wmin: Float[Array, "..."], wmax: Float[Array, "..."], bits: int
                 ) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
  """(scale, zero) float32 of groups with minimum wmin and maximum wmax (same shapes): the
  asymmetric min/max rule over the range widened to hold 0 (module docstring); a constant
  group gets scale |c| (1 for c = 0), so it dequantizes exactly. Never NaN for finite input."""
  check_bits("group_params", bits)
  wmin = jnp.asarray(wmin, jnp.float32)
  wmax = jnp.asarray(wmax, jnp.float32)
  if wmin.shape != wmax.shape:
    raise ValueError(f"group_params: wmin and wmax must have one shape; got {wmin.shape} and "
                     f"{wmax.shape}")
  qmax = max_code(bits)
  lo, hi = jnp.minimum(wmin, 0.0), jnp.maximum(wmax, 0.0)
  scale = (hi - lo) / jnp.float32(qmax)
  const = jnp.abs(wmin)
  scale = jnp.where(wmin == wmax, jnp.where(const > 0, const, jnp.float32(1)), scale)
  # A range so small that (hi − lo) / qmax underflows (or flushes) to 0: any positive scale
  # is within its tolerance; 1 keeps every division finite.
  scale = jnp.where(scale > 0, scale, jnp.float32(1))
  zero = jnp.clip(jnp.round(-lo / scale), 0, qmax)
  return scale, zero


def _expand(a: Float[Array, "G N"], group_size: int) -> Float[Array, "K N"]:
  """Group rows repeated over their group_size rows: [G, N] → [G · group_size, N]."""
  g, n = a.shape
  return jnp.broadcast_to(a[:, None, :], (g, group_size, n)).reshape(g * group_size, n)


def _codes(w, scales, zeros, bits: int, group_size: int):
  """The rounding rule, unchecked: uint8 clip(round(w / s) + z, 0, 2^bits − 1)."""
  s, z = _expand(scales, group_size), _expand(zeros, group_size)
  q = jnp.round(w.astype(jnp.float32) / s) + z
  return jnp.clip(q, 0, max_code(bits)).astype(jnp.uint8)


def quantize_with(w: Float[Array, "K N"], scales: Float[Array, "G N"], zeros: Float[Array, "G N"],
                  bits: int) -> Int[Array, "K N"]:
  """Codes uint8 [K, N] of W for given group parameters [G, N] (group_size = K / G):
  clip(round(W / s) + z, 0, 2^bits − 1). GPTQ quantizes row by row with the parameters of a
  group fixed when its first row is reached; this is its rounding rule (and RTN's).

  Raises ValueError for W not [K, N] floats, parameters not float32 [G, N] with G dividing K,
  bad bits, or (when concrete) non-finite W or scales that are not positive and finite.
  """
  w = jnp.asarray(w)
  check_bits("quantize_with", bits)
  _check_w("quantize_with", w)
  g = getattr(scales, "shape", (0,))[0] if getattr(scales, "ndim", 0) == 2 else 0
  k, n = w.shape
  if g < 1 or k % g:
    raise ValueError(f"quantize_with: scales must be [G, N] with G groups dividing K = {k} "
                     f"(group_size = K / G); got shape {_shape(scales)}")
  check_params("quantize_with", scales, zeros, k, n, k // g)
  _first_bad("quantize_with", w, lambda a: ~jnp.isfinite(a), "w must be finite")
  _first_bad("quantize_with", scales, lambda a: ~(jnp.isfinite(a) & (a > 0)),
             "scales must be positive and finite")
  return _codes(w, scales, zeros, bits, k // g)


def quantize_rtn(w: Float[Array, "K N"], bits: int, group_size: int
                 ) -> tuple[Int[Array, "K N"], Float[Array, "G N"], Float[Array, "G N"]]:
  """Round-to-nearest: W [K, N] → (codes uint8 [K, N] unpacked, scales float32 [K/group_size,
  N], zeros float32 [K/group_size, N] holding integers). Each group's (scale, zero) is
  `group_params` of its min and max, then every weight gets `quantize_with`'s code.

  Raises ValueError for W not [K, N] floats, bad bits or group_size, K not a multiple of
  group_size, or non-finite values (checked when W is concrete).
  """
  w = jnp.asarray(w)
  check_bits("quantize_rtn", bits)
  check_group_size("quantize_rtn", group_size)
  _check_w("quantize_rtn", w)
  k, n = w.shape
  check_k("quantize_rtn", k, group_size)
  _first_bad("quantize_rtn", w, lambda a: ~jnp.isfinite(a), "w must be finite")
  groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
  scales, zeros = group_params(jnp.min(groups, axis=1), jnp.max(groups, axis=1), bits)
  return _codes(w, scales, zeros, bits, group_size), scales, zeros


def dequantize(codes: Int[Array, "K N"], scales: Float[Array, "G N"], zeros: Float[Array, "G N"],
               group_size: int) -> Float[Array, "K N"]:
  """float32 W̃ [K, N] = (code − zero) · scale, from unpacked codes uint8 [K, N]."""
  check_group_size("dequantize", group_size)
  if getattr(codes, "ndim", None) != 2:
    raise ValueError(f"dequantize: codes must be [K, N] (unpacked; `unpack` packed ones first); "
                     f"got shape {_shape(codes)}")
  if codes.dtype != jnp.uint8:
    raise ValueError(f"dequantize: codes must be uint8; got {codes.dtype}")
  k, n = codes.shape
  check_k("dequantize", k, group_size)
  check_params("dequantize", scales, zeros, k, n, group_size)
  return (codes.astype(jnp.float32) - _expand(zeros, group_size)) * _expand(scales, group_size)


# --- packing --------------------------------------------------------------------------------


def pack(codes: Int[Array, "K N"], bits: int) -> Int[Array, "KP N"]:
  """Codes [K, N] (integers in [0, 2^bits)) → uint8 [K · container / 8, N]: byte j holds rows
  per·j + i at bit i·container (lowest bits: lowest row). 3-bit codes take 4-bit containers.
  Values are checked when concrete."""
  check_bits("pack", bits)
  codes = jnp.asarray(codes)
  per = codes_per_byte(bits)
  if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[0] % per:
    raise ValueError(f"pack: codes must be [K, N] with K > 0 a multiple of {per} (codes per byte "
                     f"at bits = {bits}); got shape {codes.shape}")
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"pack: codes must be integers in [0, {1 << bits}); got dtype {codes.dtype}")
  _first_bad("pack", codes, lambda c: (c < 0) | (c > max_code(bits)),
             f"codes must be in [0, {1 << bits}) for bits = {bits}")
  u = codes.astype(jnp.uint8)
  c = container_bits(bits)
  out = u[0::per]
  for i in range(1, per):
    out = out | (u[i::per] << jnp.uint8(i * c))
  return out


def unpack(packed: Int[Array, "KP N"], bits: int, k: int) -> Int[Array, "K N"]:
  """Inverse of pack: uint8 [K · container / 8, N] → uint8 codes [K, N]."""
  check_bits("unpack", bits)
  packed = jnp.asarray(packed)
  per, c = codes_per_byte(bits), container_bits(bits)
  if packed.dtype != jnp.uint8 or packed.ndim != 2:
    raise ValueError(f"unpack: packed must be uint8 [K·{c}/8, N] (pack's output); got "
                     f"{packed.dtype}{list(packed.shape)}")
  if not _is_int(k) or k < 1 or k != per * packed.shape[0]:
    raise ValueError(f"unpack: k = {k!r} does not match packed {list(packed.shape)}: at bits = "
                     f"{bits} a byte holds {per} rows, so k must be {per * packed.shape[0]}")
  return unpack_planes(packed, bits, stacked=True).reshape(k, packed.shape[1])


def unpack_planes(packed, bits: int, *, stacked: bool = False):
  """The codes of each row position in a byte: a list of `per` uint8 planes [KP, N] (plane i
  holds rows per·j + i), or, stacked, one [KP, per, N] array (row-major = row order)."""
  per, c = codes_per_byte(bits), container_bits(bits)
  mask = jnp.uint8((1 << c) - 1)
  planes = [packed if per == 1 else (packed >> jnp.uint8(i * c)) & mask for i in range(per)]
  return jnp.stack(planes, axis=1) if stacked else planes


def bits_per_weight(k: int, n: int, bits: int, group_size: int) -> float:
  """Exact storage of a [K, N] weight in bits per weight: the packed codes (container bits per
  code: 3-bit codes cost 4) plus a float32 scale and a float32 zero per group:
  container + 64 / group_size (4-bit, groups of 128: 4.5)."""
  for name, v in (("k", k), ("n", n)):
    if not _is_int(v) or v < 1:
      raise ValueError(f"bits_per_weight: {name} = {v!r} must be an int >= 1")
  check_bits("bits_per_weight", bits)
  check_group_size("bits_per_weight", group_size, bits)
  check_k("bits_per_weight", k, group_size)
  stored = container_bits(bits) * k * n + 2 * 32 * (k // group_size) * n
  return stored / (k * n)


# --- matmul ---------------------------------------------------------------------------------


def dot_f32(a: Array, b: Array, *, trans_b: bool = False) -> Float[Array, "M N"]:
  """a @ b (or a @ bᵀ) with float32 accumulation; float32 operands in full precision (a GPU's
  default may be TF32). On CPU, low-precision operands are widened first (XLA:CPU lacks some
  bf16 × bf16 → f32 dots; their products are exact in f32, so the result is the same)."""
  if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def intq_matmul_reference(x: Float[Array, "M K"], packed: Int[Array, "KP N"],
                          scales: Float[Array, "G N"], zeros: Float[Array, "G N"], *, bits: int,
                          group_size: int) -> Float[Array, "M N"]:
  """x @ W̃: the oracle. Unpacks and dequantizes the whole weight in float32, rounds it to
  x.dtype, one dot with float32 accumulation; the result in x.dtype. scales and zeros are
  stopped: the base is frozen, x is the only input with a gradient."""
  k = x.shape[1]
  w = dequantize(unpack(packed, bits, k), jax.lax.stop_gradient(scales),
                 jax.lax.stop_gradient(zeros), group_size)
  return dot_f32(x, w.astype(x.dtype)).astype(x.dtype)
