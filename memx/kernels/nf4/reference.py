"""4-bit NormalFloat (NF4) weights: levels, blockwise quantization, nibble packing, double
quantization of the block scales, and the dequantize-then-dot oracle of the matmul.

QLoRA (Dettmers et al. 2023, §3): a frozen base weight W [K, N] (used as x @ W, K the
contraction dim) is stored as 4-bit codes into the 16 NF4 levels q_0 < ... < q_15 (`NF4_LEVELS`,
in [-1, 1]) and one absmax per block of `block_size` (64) consecutive rows of one column:

  a[b, n] = max_{k in block b} |W[k, n]|                   float32 [K / block_size, N]
  code[k, n] = argmin_i |W[k, n] / a[b, n] - q_i|          (b = k // block_size)
  W̃[k, n] = q_{code[k, n]} · a[b, n]

Packing: two codes per byte along K, uint8 [K/2, N]: row 2i in the low nibble, row 2i+1 in the
high nibble (byte = code[2i] | code[2i+1] << 4).

Double quantization (§3, "Double Quantization"): the absmax array is itself quantized, saving
another ~0.37 bits per weight. The absmax values are all positive, so their mean is subtracted
first (`offset`, one float32) to use the sign bit; the centred values, flattened row-major, are
split into groups of `group_size` (256) and quantized symmetrically to int8 with one float32
scale per group: c ≈ q · scale, scale = max|c| / 127. (The paper quantizes them to 8-bit floats;
int8 with an absmax scale is this package's choice.)

The base is frozen: the matmul is differentiable with respect to x only. codes are integers and
absmax gets no gradient in any implementation (the reference stops it, so every implementation
computes the same function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memx.typing import Array, Float, Int

# The 16 NF4 levels, float32, sorted. QLoRA's construction (§3, "4-bit NormalFloat"): an
# information-theoretically optimal 4-bit type for N(0, 1) weights takes equal-mass quantiles of
# the normal distribution, but a symmetric set of 2^k quantiles has no exact zero. NF4 is made
# asymmetric instead: 2^(k-1) + 1 = 9 quantiles for the positive half and 2^(k-1) = 8 for the
# negative half, each set running from the outermost probability δ to the median ½ (whose
# quantile is 0); the two zeros are merged into one, and the set is normalised by its largest
# value into [-1, 1]:
#
#   δ = ½ · ((1 − 1/(2·15)) + (1 − 1/(2·16))) = 0.9677083   (the mean of the outermost
#       probability that a 15- and a 16-quantile construction would use; Φ⁻¹(1) = ∞)
#   positive: Φ⁻¹(δ − i (δ − ½) / 8), i = 0..7   (8 levels > 0; i = 8 is the zero)
#   negative: −Φ⁻¹(δ − i (δ − ½) / 7), i = 0..6   (7 levels < 0; i = 7 is the zero)
#   levels = sorted(positive ∪ {0} ∪ negative) / Φ⁻¹(δ)
#
# so the set holds exactly -1, 0 and 1 (codes 0, 7, 15). The values are stored here (computed in
# float64 with scipy.stats.norm.ppf) because memx.kernels must import without scipy; the tests
# rebuild them from the construction above.
NF4_LEVELS = np.array([
    -1.0,
    -0.69619289060372,
    -0.5250730386952291,
    -0.3949174906993099,
    -0.2844413576181077,
    -0.18477343519288886,
    -0.09104999214427931,
    0.0,
    0.07958032909416937,
    0.16093017270493618,
    0.2461122939299359,
    0.33791519352165506,
    0.44070980241319013,
    0.562616970075237,
    0.7229567278928821,
    1.0,
], np.float32)
NF4_LEVELS.flags.writeable = False

# Decision boundaries of the nearest-level rule: the midpoints of neighbouring levels (taken in
# float64 from the float32 levels, then rounded to float32). A value strictly above midpoint i
# is nearer to level i + 1; a value exactly on a midpoint (a tie) takes the LOWER level.
_MIDPOINTS = ((NF4_LEVELS[:-1].astype(np.float64) + NF4_LEVELS[1:]) / 2).astype(np.float32)

DEFAULT_BLOCK_SIZE = 64    # QLoRA's weight block
DEFAULT_GROUP_SIZE = 256   # QLoRA's block of absmax values in the double quantization
_QMAX = 127


# --- checks ---------------------------------------------------------------------------------


def _shape(a) -> tuple | None:
  s = getattr(a, "shape", None)
  return None if s is None else tuple(s)


def check_block_size(op: str, block_size) -> None:
  """block_size: an even int >= 2 (two codes of a byte share one block)."""
  if (not isinstance(block_size, int | np.integer) or isinstance(block_size, bool)
      or block_size < 2 or block_size % 2):
    raise ValueError(f"{op}: block_size = {block_size!r} is not allowed: it must be an even int "
                     f">= 2 (two rows share a byte, so a block must not split one)")


def check_k(op: str, k: int, block_size: int) -> None:
  """K > 0 and a multiple of block_size."""
  if k <= 0:
    raise ValueError(f"{op}: K = {k} rows: the weight is empty")
  if k % block_size:
    raise ValueError(f"{op}: K = {k} is not a multiple of block_size = {block_size}; allowed: K a "
                     f"multiple of block_size (pad W with zero rows and x with zero columns to "
                     f"{-(-k // block_size) * block_size})")


def _check_group_size(op: str, group_size) -> None:
  if not isinstance(group_size, int | np.integer) or isinstance(group_size, bool) or group_size < 1:
    raise ValueError(f"{op}: group_size = {group_size!r} is not allowed: it must be an int >= 1")


def _first_bad(op: str, a, bad, what: str) -> None:
  """Raises ValueError naming the first element where bad(a) holds, when a is concrete (a traced
  a cannot be checked: the caller promised valid values). The test runs where a lives; only
  a failing array is copied to the host."""
  if isinstance(a, jax.core.Tracer):
    return
  mask = bad(a)
  if not bool(jnp.any(mask)):
    return
  arr, mask = np.asarray(a), np.asarray(mask)
  idx = tuple(int(i) for i in np.argwhere(mask)[0])
  raise ValueError(f"{op}: {what}; found {arr[idx]!r} at index {idx} ({int(mask.sum())} bad "
                   f"entries)")


def check_codes_absmax(op: str, codes, absmax, block_size: int) -> tuple[int, int]:
  """codes uint8 [K/2, N] and absmax float32 [K/block_size, N] of one weight: returns (K, N)."""
  check_block_size(op, block_size)
  if getattr(codes, "ndim", None) != 2:
    raise ValueError(f"{op}: codes must be [K/2, N] (quantize's packed output); got shape "
                     f"{_shape(codes)}")
  if codes.dtype != jnp.uint8:
    raise ValueError(f"{op}: codes must be uint8 (two 4-bit codes per byte); got {codes.dtype}")
  if getattr(absmax, "ndim", None) != 2:
    raise ValueError(f"{op}: absmax must be [K/block_size, N]; got shape {_shape(absmax)}")
  if absmax.dtype != jnp.float32:
    raise ValueError(f"{op}: absmax must be float32 (quantize's output, or dequantize_absmax's "
                     f"for double-quantized scales); got {absmax.dtype}")
  k, n = 2 * codes.shape[0], codes.shape[1]
  check_k(op, k, block_size)
  if tuple(absmax.shape) != (k // block_size, n):
    raise ValueError(f"{op}: codes [{k // 2}, {n}] hold K = {k} rows and N = {n} columns, so "
                     f"absmax must be [K/block_size, N] = [{k // block_size}, {n}] for "
                     f"block_size = {block_size}; got {list(absmax.shape)}")
  return k, n


# --- nibble packing -------------------------------------------------------------------------


def pack_nibbles(codes: Int[Array, "K ..."]) -> Int[Array, "K2 ..."]:
  """4-bit codes [K, ...] (integers in [0, 16)) → uint8 [K/2, ...]: byte i holds row 2i in its
  low nibble and row 2i + 1 in its high nibble. Values are checked when concrete."""
  codes = jnp.asarray(codes)
  if codes.ndim < 1 or codes.shape[0] % 2 or codes.shape[0] == 0:
    raise ValueError(f"pack_nibbles: codes must be [K, ...] with K even and > 0 (two rows per "
                     f"byte); got shape {codes.shape}")
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"pack_nibbles: codes must be integers in [0, 16); got dtype {codes.dtype}")
  _first_bad("pack_nibbles", codes, lambda c: (c < 0) | (c > 15), "codes must be in [0, 16)")
  u = codes.astype(jnp.uint8)
  return u[0::2] | (u[1::2] << jnp.uint8(4))


def unpack_nibbles(packed: Int[Array, "K2 ..."]) -> Int[Array, "K ..."]:
  """Inverse of pack_nibbles: uint8 [K/2, ...] → uint8 codes [K, ...] in [0, 16)."""
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8 or packed.ndim < 1:
    raise ValueError(f"unpack_nibbles: packed must be uint8 [K/2, ...] (pack_nibbles' output); "
                     f"got {packed.dtype}{list(packed.shape)}")
  pair = jnp.stack([packed & jnp.uint8(15), packed >> jnp.uint8(4)], axis=1)
  return pair.reshape((2 * packed.shape[0],) + packed.shape[1:])


# --- quantization ---------------------------------------------------------------------------


def nearest_level(v: Float[Array, "..."]) -> Int[Array, "..."]:
  """Index (uint8) of the NF4 level nearest to each v (v/absmax, so in [-1, 1]); a tie goes to
  the lower level. Counts the midpoints below v: 15 compares, no [..., 16] intermediate."""
  v = jnp.asarray(v, jnp.float32)
  code = jnp.zeros(v.shape, jnp.uint8)
  for m in _MIDPOINTS:
    code = code + (v > m).astype(jnp.uint8)
  return code


def levels_of(codes: Int[Array, "..."]) -> Float[Array, "..."]:
  """The float32 NF4 level of each code (a lookup in the 16-entry table)."""
  return jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]


def quantize(w: Float[Array, "K N"], block_size: int = DEFAULT_BLOCK_SIZE
             ) -> tuple[Int[Array, "K2 N"], Float[Array, "B N"]]:
  """W [K, N] → (codes uint8 [K/2, N], absmax float32 [K/block_size, N]).

  Each block of `block_size` consecutive rows of one column gets absmax = max |W| over it, and
  each element the code of the NF4 level nearest to W / absmax (a tie between two levels takes
  the lower one). W = 0, ±absmax are reproduced exactly (levels 0 and ±1). An all-zero block
  gets absmax 0, which dequantizes to exact zeros (the division uses 1 in its place).

  Raises ValueError for W not [K, N] floats, K not a multiple of block_size (pad K), an odd
  block_size, or non-finite values (checked when W is concrete).
  """
  w = jnp.asarray(w)
  check_block_size("quantize", block_size)
  if w.ndim != 2:
    raise ValueError(f"quantize: w must be [K, N] (used as x @ w); got shape {w.shape}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"quantize: w must be floating point; got {w.dtype}")
  k, n = w.shape
  check_k("quantize", k, block_size)
  _first_bad("quantize", w, lambda a: ~jnp.isfinite(a), "w must be finite")
  blocks = w.astype(jnp.float32).reshape(k // block_size, block_size, n)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, jnp.float32(1))
  codes = nearest_level(blocks / safe[:, None, :]).reshape(k, n)
  return pack_nibbles(codes), absmax


def row_scales(absmax: Float[Array, "B N"], block_size: int) -> Float[Array, "K N"]:
  """absmax repeated over the block_size rows of each block: [K, N]."""
  nb, n = absmax.shape
  return jnp.broadcast_to(absmax[:, None, :], (nb, block_size, n)).reshape(nb * block_size, n)


def dequantize(codes: Int[Array, "K2 N"], absmax: Float[Array, "B N"],
               block_size: int = DEFAULT_BLOCK_SIZE) -> Float[Array, "K N"]:
  """Inverse of quantize, up to the rounding to levels: float32 W̃ [K, N] = level · absmax."""
  check_codes_absmax("dequantize", codes, absmax, block_size)
  return levels_of(unpack_nibbles(codes)) * row_scales(absmax, block_size)


# --- double quantization of absmax ----------------------------------------------------------


def _groups(size: int, group_size: int) -> int:
  return -(-size // group_size)


def quantize_absmax(absmax: Float[Array, "..."], group_size: int = DEFAULT_GROUP_SIZE
                    ) -> tuple[Int[Array, "..."], Float[Array, " G"], Float[Array, ""]]:
  """absmax (any shape) → (q int8 same shape, scales float32 [⌈size / group_size⌉], offset
  float32 scalar): offset = mean(absmax); the centred values, flattened row-major, in groups of
  group_size consecutive elements (the last one possibly shorter) are q = round(c / scale)
  with scale = max|c| / 127 per group (0 for an all-zero group, whose q are 0)."""
  _check_group_size("quantize_absmax", group_size)
  a = jnp.asarray(absmax)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(f"quantize_absmax: absmax must be floating point; got {a.dtype}")
  if a.size == 0:
    raise ValueError(f"quantize_absmax: absmax is empty (shape {a.shape}); nothing to quantize")
  a = a.astype(jnp.float32)
  offset = jnp.mean(a)
  c = (a - offset).reshape(-1)
  g = _groups(c.size, group_size)
  c = jnp.pad(c, (0, g * group_size - c.size)).reshape(g, group_size)
  scales = jnp.max(jnp.abs(c), axis=1) / _QMAX
  safe = jnp.where(scales > 0, scales, jnp.float32(1))
  q = jnp.clip(jnp.round(c / safe[:, None]), -_QMAX, _QMAX).astype(jnp.int8)
  return q.reshape(-1)[:a.size].reshape(a.shape), scales, offset


def dequantize_absmax(q: Int[Array, "..."], scales: Float[Array, " G"], offset: Float[Array, ""],
                      group_size: int = DEFAULT_GROUP_SIZE) -> Float[Array, "..."]:
  """Inverse of quantize_absmax, up to rounding: float32 q · scale + offset, shaped as q."""
  _check_group_size("dequantize_absmax", group_size)
  q, scales, offset = jnp.asarray(q), jnp.asarray(scales), jnp.asarray(offset)
  if q.dtype != jnp.int8:
    raise ValueError(f"dequantize_absmax: q must be int8 (quantize_absmax's output); got {q.dtype}")
  if q.size == 0:
    raise ValueError(f"dequantize_absmax: q is empty (shape {q.shape})")
  g = _groups(q.size, group_size)
  if scales.shape != (g,) or scales.dtype != jnp.float32:
    raise ValueError(f"dequantize_absmax: {q.size} values in groups of {group_size} need float32 "
                     f"scales of shape ({g},); got {scales.dtype}{list(scales.shape)}")
  if offset.shape != () or offset.dtype != jnp.float32:
    raise ValueError(f"dequantize_absmax: offset must be a float32 scalar; got "
                     f"{offset.dtype}{list(offset.shape)}")
  flat = jnp.pad(q.reshape(-1).astype(jnp.float32), (0, g * group_size - q.size))
  c = (flat.reshape(g, group_size) * scales[:, None]).reshape(-1)[:q.size]
  return c.reshape(q.shape) + offset


def bits_per_weight(k: int, n: int, block_size: int = DEFAULT_BLOCK_SIZE,
                    group_size: int | None = DEFAULT_GROUP_SIZE) -> float:
  """Exact storage of a [K, N] weight in bits per weight: 4-bit codes, plus one int8 absmax per
  block, one float32 scale per group of absmax values and one float32 offset (double
  quantization), or one float32 absmax per block for group_size=None.

  With block_size 64 and group_size 256: 4 + 8/64 + 32/(64·256) + 32/(K·N) ≈ 4.127 (when the
  blocks fill whole groups; otherwise the last group still costs a full scale).
  """
  for name, v in (("k", k), ("n", n)):
    if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
      raise ValueError(f"bits_per_weight: {name} = {v!r} must be an int >= 1")
  check_block_size("bits_per_weight", block_size)
  check_k("bits_per_weight", k, block_size)
  blocks = k // block_size * n
  if group_size is None:
    extra = 32 * blocks
  else:
    _check_group_size("bits_per_weight", group_size)
    extra = 8 * blocks + 32 * _groups(blocks, group_size) + 32
  return (4 * k * n + extra) / (k * n)


# --- matmul ---------------------------------------------------------------------------------


def dot_f32(a: Array, b: Array, *, trans_b: bool = False) -> Float[Array, "M N"]:
  """a @ b (or a @ bᵀ) with float32 accumulation. Operands are in the compute dtype already;
  float32 operands run in full precision (XLA's GPU default may be TF32, ~1e-3 relative error).

  On the CPU backend low-precision operands are widened to float32 first: XLA:CPU lacks some
  bf16 x bf16 → fp32 dot layouts, and the product of two bf16/fp16 numbers is exact in fp32, so
  the result is the same."""
  if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def nf4_matmul_reference(x: Float[Array, "M K"], codes: Int[Array, "K2 N"],
                         absmax: Float[Array, "B N"], block_size: int = DEFAULT_BLOCK_SIZE
                         ) -> Float[Array, "M N"]:
  """x @ W̃: the oracle. Dequantizes the whole weight (float32 level · absmax), rounds it to
  x.dtype (as QLoRA computes in the activations' dtype), one dot with float32 accumulation;
  the result in x.dtype. absmax is stopped: the base is frozen, x is the only input with a
  gradient."""
  w = dequantize(codes, jax.lax.stop_gradient(absmax), block_size)
  return dot_f32(x, w.astype(x.dtype)).astype(x.dtype)
