"""Ternary (1.58-bit) quantization, 2-bit packing and the packed matmul oracle.

BitNet b1.58 (Ma et al. 2024) / MatMul-free LM (Zhu et al. 2024, §3.1) quantizers, as in
ridgerchu/matmulfreellm's `BitLinear`:

  weights:      s_w = mean|W|,  W̃ = clip(round(W / s_w), -1, 1) ∈ {-1, 0, 1}   (per tensor)
  activations:  s_x = 127 / max_j |x_j|,  x̃ = clip(round(x · s_x), -128, 127)  (per token)
  y = (x̃ @ W̃) · s_w / s_x

so the matmul itself needs only additions and subtractions of int8 values.

Packing: 4 ternary weights per byte along the first (K) axis: byte[j, n] holds
W̃[4j + i, n] + 1 ∈ {0, 1, 2} in bits 2i..2i+1 (i = 0..3). K is padded to a multiple of 4 with
zeros (code 1, so padding bytes decode to weight 0), giving exactly ⌈K/4⌉ bytes per column.

Word layout (`to_words`): the same bytes read four columns at a time, int32 [⌈K/4⌉, N/4] with
word[j, c] = Σ_l byte[j, 4c + l] << 8l (their little-endian memory layout). Every packed matmul
accepts either layout; the Pallas decode kernel loads words directly (one 32-bit load per 16
weights), which the byte layout cannot give it without an XLA copy per call.
"""

import jax
import jax.numpy as jnp
import numpy as np

from memx.typing import Array, Float, Int

EPS = 1e-5  # the reference clamps mean|W| and max|x| at 1e-5 so all-zero inputs stay finite
QMAX = 127
ZERO_BYTE = 0x55  # four codes of 1 = four zero weights


# --- quantizers -----------------------------------------------------------------------------


def absmean_quantize(w: Float[Array, "..."]) -> tuple[Int[Array, "..."], Float[Array, ""]]:
  """W → (ternary codes int8 in {-1, 0, 1}, scale s_w = mean|W| float32); W ≈ codes · s_w."""
  w32 = jnp.asarray(w, jnp.float32)
  scale = jnp.maximum(jnp.mean(jnp.abs(w32)), EPS)
  codes = jnp.clip(jnp.round(w32 / scale), -1, 1).astype(jnp.int8)
  return codes, scale


def absmax_quantize(x: Float[Array, "... K"]) -> tuple[Int[Array, "... K"], Float[Array, "... 1"]]:
  """x → (int8 codes in [-128, 127] per token, scale s_x = 127 / max|x| [..., 1] float32).

  x ≈ codes / s_x; the largest entry of each token maps to ±127.
  """
  x32 = jnp.asarray(x, jnp.float32)
  scale = QMAX / jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), EPS)
  codes = jnp.clip(jnp.round(x32 * scale), -128, 127).astype(jnp.int8)
  return codes, scale


def ternary_fake_quant(w: Float[Array, "..."]) -> Float[Array, "..."]:
  """codes · s_w in w.dtype, with a straight-through gradient (dL/dW = dL/dW̃ unchanged).

  The reference's `w + (weight_quant(w) - w).detach()`, written `q + (w - stop_gradient(w))`:
  the same identity backward, and a forward value of exactly q (the reference's form rounds
  twice, leaving ~2% of bf16 outputs one ulp off the ternary grid).
  """
  codes, scale = absmean_quantize(w)
  q = (codes.astype(jnp.float32) * scale).astype(w.dtype)
  return _straight_through(w, q)


def _straight_through(x, q):
  """Value q, gradient identity with respect to x (none through q's own dependence on x)."""
  return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


def int8_fake_quant(x: Float[Array, "... K"]) -> Float[Array, "... K"]:
  """codes / s_x in x.dtype with a straight-through gradient (per-token absmax, 8 bits)."""
  codes, scale = absmax_quantize(x)
  q = (codes.astype(jnp.float32) / scale).astype(x.dtype)
  return _straight_through(x, q)


# --- packing --------------------------------------------------------------------------------


def packed_rows(k: int) -> int:
  """Packed rows (bytes per column) for K ternary weights: ⌈K/4⌉."""
  return -(-k // 4)


def _check_ternary_concrete(codes) -> None:
  try:
    arr = np.asarray(codes)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced: the caller promised codes; values cannot be checked here
  bad = ~np.isin(arr, (-1, 0, 1))
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"pack_ternary: codes must be in {{-1, 0, 1}}; found {arr[idx]!r} at index "
                     f"{idx} ({int(bad.sum())} bad entries). Quantize first with "
                     f"absmean_quantize.")


def pack_ternary(codes: Int[Array, "K ..."]) -> Int[Array, "Kp ..."]:
  """Ternary codes [K] or [K, N] → uint8 [⌈K/4⌉] or [⌈K/4⌉, N], 4 weights per byte along K.

  K need not be a multiple of 4: the last byte is padded with zero weights, and `unpack_ternary`
  takes K back. Raises ValueError for a value outside {-1, 0, 1} (checked when concrete) or a
  rank other than 1 or 2.
  """
  codes = jnp.asarray(codes)
  if codes.ndim not in (1, 2):
    raise ValueError(f"pack_ternary: codes must be [K] or [K, N]; got shape {codes.shape}")
  if codes.shape[0] == 0:
    raise ValueError("pack_ternary: K = 0; nothing to pack")
  if not (jnp.issubdtype(codes.dtype, jnp.integer) or jnp.issubdtype(codes.dtype, jnp.floating)):
    raise ValueError(f"pack_ternary: codes dtype {codes.dtype} is not numeric")
  _check_ternary_concrete(codes)
  k = codes.shape[0]
  kp = packed_rows(k)
  u = (codes.astype(jnp.int32) + 1).astype(jnp.uint8)  # {0, 1, 2}
  pad = [(0, 4 * kp - k)] + [(0, 0)] * (codes.ndim - 1)
  u = jnp.pad(u, pad, constant_values=1)
  u = u.reshape((kp, 4) + codes.shape[1:])
  out = jnp.zeros((kp,) + codes.shape[1:], jnp.uint8)
  for i in range(4):
    out = out | (u[:, i] << jnp.uint8(2 * i))
  return out


def to_words(packed: Int[Array, "Kp N"]) -> Int[Array, "Kp C"]:
  """Packed bytes uint8 [Kp, N] → int32 words [Kp, N/4] (N must be a multiple of 4)."""
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8 or packed.ndim != 2:
    raise ValueError(f"to_words: packed must be uint8 [Kp, N] (pack_ternary's output); got "
                     f"{packed.dtype}{list(packed.shape)}")
  kp, n = packed.shape
  if n % 4:
    raise ValueError(f"to_words: N = {n} columns is not a multiple of 4; keep the byte layout "
                     f"for this weight")
  b = packed.astype(jnp.uint32).reshape(kp, n // 4, 4)
  w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
  return jax.lax.bitcast_convert_type(w, jnp.int32)


def from_words(words: Int[Array, "Kp C"]) -> Int[Array, "Kp N"]:
  """Inverse of to_words: int32 [Kp, C] → uint8 [Kp, 4C]."""
  u = jax.lax.bitcast_convert_type(jnp.asarray(words), jnp.uint32)
  b = jnp.stack([(u >> (8 * lane)) & 0xFF for lane in range(4)], axis=-1)
  return b.astype(jnp.uint8).reshape(u.shape[0], 4 * u.shape[1])


def as_bytes(packed: Array) -> Array:
  """The byte layout of packed weights given in either layout."""
  return from_words(packed) if packed.dtype == jnp.int32 else packed


def packed_cols(packed: Array) -> int:
  """N, the output features of packed weights in either layout."""
  return packed.shape[-1] * (4 if packed.dtype == jnp.int32 else 1)


def unpack_planes(packed: Int[Array, "Kp ..."]) -> list[Int[Array, "Kp ..."]]:
  """The four int8 weight planes of a packed array: plane i holds rows 4j + i."""
  return [((packed >> jnp.uint8(2 * i)) & jnp.uint8(3)).astype(jnp.int8) - jnp.int8(1)
          for i in range(4)]


def unpack_ternary(packed: Int[Array, "Kp ..."], k: int) -> Int[Array, "K ..."]:
  """Inverse of pack_ternary: uint8 [⌈K/4⌉, ...] → int8 codes [K, ...]."""
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack_ternary: packed must be uint8, got {packed.dtype}")
  if packed.ndim not in (1, 2) or packed.shape[0] != packed_rows(k):
    raise ValueError(f"unpack_ternary: packed shape {packed.shape} does not hold K = {k} rows "
                     f"(expected {packed_rows(k)} packed rows)")
  planes = unpack_planes(packed)
  codes = jnp.stack(planes, axis=1).reshape((4 * packed.shape[0],) + packed.shape[1:])
  return codes[:k]


# --- matmul ---------------------------------------------------------------------------------


def packed_matmul_reference(x: Float[Array, "M K"] | Int[Array, "M K"],
                            packed: Int[Array, "Kp N"]) -> Array:
  """x @ unpack(packed): the oracle. Unpacks the full weight, then one dot.

  Integer x (int8) accumulates in int32 exactly; floating x unpacks W to x.dtype (exact: ±1, 0)
  and accumulates in float32. Returns int32 or float32 [M, N]. packed: bytes or words.
  """
  k = x.shape[1]
  w = unpack_ternary(as_bytes(packed), k)
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.dot(x, w, preferred_element_type=jnp.int32)
  return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
