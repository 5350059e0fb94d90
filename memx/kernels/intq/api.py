"""intq_matmul(): the one entry point for matmuls on group-wise affine integer weights (GPTQ,
RTN)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp

from memx.kernels._dispatch import choose, gpu_backend, portable_or_pallas_reason
from memx.kernels.intq import pallas_gpu
from memx.kernels.intq.config import BlockSizes
from memx.kernels.intq.reference import check_packed, intq_matmul_reference
from memx.kernels.intq.xla import intq_matmul_xla
from memx.typing import Array, Float, Int

Implementation = Literal["reference", "xla", "pallas_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu")
_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  return ("pallas_gpu", "xla") if gpu_backend() else ("xla",)


def _check_inputs(x, packed, scales, zeros, bits, group_size) -> None:
  """ValueError for bad input, before anything is traced."""
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"intq_matmul: x must be [..., K]; got shape {getattr(x, 'shape', None)}")
  if x.dtype not in _X_DTYPES:
    raise ValueError(f"intq_matmul: x dtype {x.dtype} is not supported; use float32, bfloat16 "
                     f"or float16")
  k, n = check_packed("intq_matmul", packed, scales, zeros, bits, group_size)
  if x.shape[-1] != k:
    raise ValueError(f"intq_matmul: x has K = {x.shape[-1]} features but packed "
                     f"{list(packed.shape)} holds a weight of K = {k} rows at bits = {bits}")


def unsupported_reason(name: str, *, k: int, bits: int, group_size: int,
                       block_sizes: BlockSizes | None, interpret: bool) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  why = portable_or_pallas_reason("intq_matmul", name, IMPLEMENTATIONS, interpret=interpret,
                                  on_gpu=gpu_backend())
  if why is None and name == "pallas_gpu":
    why = pallas_gpu.unsupported_reason(k, group_size, bits, block_sizes)
  return why


def intq_matmul(
    x: Float[Array, "... K"],
    packed: Int[Array, "KP N"],
    scales: Float[Array, "G N"],
    zeros: Float[Array, "G N"],
    *,
    bits: int,
    group_size: int,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "... N"]:
  """y = x @ W̃ for an integer weight W̃ [K, N] stored as `pack(codes, bits)`, scales, zeros
  (`quantize_rtn`'s or GPTQ's).

  W̃[k, n] = (code[k, n] − zero[g, n]) · scale[g, n] (g = k // group_size) in float32, rounded
  to x.dtype; products accumulate in float32 and y is returned in x.dtype. The weight is
  frozen: y is differentiable with respect to x only (codes are integers; scales and zeros get
  a zero cotangent in every implementation).

  Args:
    x: activations [..., K], float32, bfloat16 or float16.
    packed: uint8 [K·container/8, N]: `pack`'s output (4, 2, 2, 1 codes per byte at bits = 2,
      3, 4, 8; 3-bit codes in 4-bit containers).
    scales, zeros: float32 [K/group_size, N] (zeros hold integers in [0, 2^bits − 1]).
    bits: 2, 3, 4 or 8.
    group_size: rows per group: a multiple of the codes per byte; K must be a multiple of it.
    implementation: None dispatches by backend (pallas_gpu then xla on an NVIDIA GPU, else xla);
      a single name forces it and raises if it cannot serve; a sequence is tried in order,
      warning on every skip. `reference` dequantizes the whole weight (the oracle); `xla`
      dequantizes a few hundred rows at a time; `pallas_gpu` dequantizes tiles in registers.
    block_sizes: pallas_gpu tiles (`BlockSizes`).
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).

  Raises:
    ValueError: malformed inputs (shapes, dtypes, K mismatch, bits, group_size).
    NotImplementedError: the requested implementation(s) cannot serve the inputs.
  """
  _check_inputs(x, packed, scales, zeros, bits, group_size)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"intq_matmul: block_sizes must be a memx.kernels.intq.BlockSizes, got "
                     f"{block_sizes!r}")
  k = x.shape[-1]
  name = choose("intq_matmul", implementation, default_order(),
                lambda nm: unsupported_reason(nm, k=k, bits=bits, group_size=group_size,
                                              block_sizes=block_sizes, interpret=interpret))
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)  # one canonical [M, K] shape for every implementation
  if name == "reference":
    y = intq_matmul_reference(x2, packed, scales, zeros, bits=bits, group_size=group_size)
  elif name == "xla":
    y = intq_matmul_xla(x2, packed, scales, zeros, bits=bits, group_size=group_size)
  else:
    y = pallas_gpu.intq_matmul_pallas_gpu(x2, packed, scales, zeros, bits=bits,
                                          group_size=group_size, block_sizes=block_sizes,
                                          interpret=interpret)
  return y.reshape(lead + (packed.shape[1],))
