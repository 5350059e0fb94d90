"""packed_matmul(): the one entry point for matmuls on 2-bit packed ternary weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp

from memx.kernels._dispatch import choose, gpu_backend, portable_or_pallas_reason
from memx.kernels.ternary.config import BlockSizes
from memx.kernels.ternary.pallas_gpu import packed_matmul_pallas_gpu
from memx.kernels.ternary.reference import packed_cols, packed_matmul_reference, packed_rows
from memx.kernels.ternary.xla import packed_matmul_xla
from memx.typing import Array

Implementation = Literal["reference", "xla", "pallas_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu")
_X_DTYPES = (jnp.int8, jnp.float32, jnp.bfloat16, jnp.float16)


def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  return ("pallas_gpu", "xla") if gpu_backend() else ("xla",)


def _check_inputs(x, packed) -> None:
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"packed_matmul: x must be [..., K]; got shape {getattr(x, 'shape', None)}")
  if getattr(packed, "ndim", None) != 2:
    raise ValueError(f"packed_matmul: packed weights must be [ceil(K/4), N] bytes or "
                     f"[ceil(K/4), N/4] words; got shape {getattr(packed, 'shape', None)}")
  if packed.dtype not in (jnp.uint8, jnp.int32):
    raise ValueError(f"packed_matmul: packed weights must be uint8 bytes (pack_ternary's output) "
                     f"or int32 words (to_words), got {packed.dtype}")
  k = x.shape[-1]
  if k == 0:
    raise ValueError("packed_matmul: x has K = 0 features: there is nothing to multiply (the "
                     "packed weights hold at least one row of 4)")
  if packed.shape[0] != packed_rows(k):
    raise ValueError(f"packed_matmul: x has K = {k} features, so the packed weights need "
                     f"ceil(K/4) = {packed_rows(k)} rows; got {packed.shape[0]}")
  if x.dtype not in _X_DTYPES:
    raise ValueError(f"packed_matmul: x dtype {x.dtype} is not supported; use int8 (quantized "
                     f"activations) or float32/bfloat16/float16")


def unsupported_reason(name: str, interpret: bool) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  return portable_or_pallas_reason("packed_matmul", name, IMPLEMENTATIONS, interpret=interpret,
                                   on_gpu=gpu_backend())


def packed_matmul(
    x: Array,
    packed: Array,
    *,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Array:
  """y = x @ W̃ for ternary W̃ [K, N] stored as `pack_ternary(W̃)` (uint8 [⌈K/4⌉, N]).

  Args:
    x: activations [..., K]: int8 codes (exact int32 result) or floats (float32 result).
    packed: 2-bit weights, 4 per byte along K: uint8 bytes [⌈K/4⌉, N], or the same bytes as
      int32 words [⌈K/4⌉, N/4] (`to_words`), which the Pallas decode form loads 16 weights at a
      time. Results are identical.
    implementation: None dispatches by backend (pallas_gpu on an NVIDIA GPU, else xla); a single
      name forces it and raises if it cannot serve; a sequence is tried in order, warning on
      every skip.
    block_sizes: pallas_gpu tiles (`BlockSizes`).
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).

  Returns:
    [..., N], int32 for int8 x (bit-exact in every implementation), float32 otherwise. Scales
    are the caller's: y_real = y · s_w / s_x.

  Raises:
    ValueError: malformed inputs. NotImplementedError: the requested implementation(s) cannot
    serve the inputs.
  """
  _check_inputs(x, packed)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"packed_matmul: block_sizes must be a BlockSizes, got {block_sizes!r}")
  name = choose("packed_matmul", implementation, default_order(),
                lambda n: unsupported_reason(n, interpret))
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])  # one canonical [M, K] shape for every implementation
  if name == "reference":
    y = packed_matmul_reference(x2, packed)
  elif name == "xla":
    y = packed_matmul_xla(x2, packed)
  else:
    y = packed_matmul_pallas_gpu(x2, packed, block_sizes=block_sizes, interpret=interpret)
  return y.reshape(lead + (packed_cols(packed),))
