"""nf4_matmul(): the one entry point for matmuls on NF4-quantized (QLoRA) weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp

from memx.kernels._dispatch import choose, gpu_backend, portable_or_pallas_reason
from memx.kernels.nf4 import pallas_gpu
from memx.kernels.nf4.config import BlockSizes
from memx.kernels.nf4.reference import (
    DEFAULT_BLOCK_SIZE,
    check_codes_absmax,
    nf4_matmul_reference,
)
from memx.kernels.nf4.xla import nf4_matmul_xla
from memx.typing import Array, Float, Int

Implementation = Literal["reference", "xla", "pallas_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu")
_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  return ("pallas_gpu", "xla") if gpu_backend() else ("xla",)


def _check_inputs(x, codes, absmax, block_size) -> None:
  """ValueError for bad input, before anything is traced."""
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"nf4_matmul: x must be [..., K]; got shape {getattr(x, 'shape', None)}")
  if x.dtype not in _X_DTYPES:
    raise ValueError(f"nf4_matmul: x dtype {x.dtype} is not supported; use float32, bfloat16 "
                     f"or float16")
  k, _ = check_codes_absmax("nf4_matmul", codes, absmax, block_size)
  if x.shape[-1] != k:
    raise ValueError(f"nf4_matmul: x has K = {x.shape[-1]} features but the codes [{k // 2}, "
                     f"{codes.shape[1]}] hold a weight of K = {k} rows")


def unsupported_reason(name: str, *, k: int, block_size: int, block_sizes: BlockSizes | None,
                       interpret: bool) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  why = portable_or_pallas_reason("nf4_matmul", name, IMPLEMENTATIONS, interpret=interpret,
                                  on_gpu=gpu_backend())
  if why is None and name == "pallas_gpu":
    why = pallas_gpu.unsupported_reason(k, block_size, block_sizes)
  return why


def nf4_matmul(
    x: Float[Array, "... K"],
    codes: Int[Array, "K2 N"],
    absmax: Float[Array, "B N"],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "... N"]:
  """y = x @ W̃ for an NF4 weight W̃ [K, N] stored as `quantize(W, block_size)`.

  W̃[k, n] = NF4_LEVELS[code[k, n]] · absmax[k // block_size, n], rounded to x.dtype; products
  accumulate in float32 and y is returned in x.dtype. The weight is frozen: y is differentiable
  with respect to x only (codes are integers; absmax gets a zero cotangent in every
  implementation).

  Args:
    x: activations [..., K], float32, bfloat16 or float16.
    codes: uint8 [K/2, N], two codes per byte along K (row 2i low nibble, 2i+1 high).
    absmax: float32 [K/block_size, N], the per-block scales (`dequantize_absmax` first for
      double-quantized storage).
    block_size: rows per absmax block (even; K must be a multiple).
    implementation: None dispatches by backend (pallas_gpu then xla on an NVIDIA GPU, else xla);
      a single name forces it and raises if it cannot serve; a sequence is tried in order,
      warning on every skip. `reference` dequantizes the whole weight (the oracle); `xla`
      dequantizes one K chunk at a time; `pallas_gpu` dequantizes tiles in registers.
    block_sizes: pallas_gpu tiles (`BlockSizes`).
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).

  Raises:
    ValueError: malformed inputs (shapes, dtypes, K mismatch, block_size). NotImplementedError:
    the requested implementation(s) cannot serve the inputs.
  """
  _check_inputs(x, codes, absmax, block_size)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"nf4_matmul: block_sizes must be a memx.kernels.nf4.BlockSizes, got "
                     f"{block_sizes!r}")
  k = x.shape[-1]
  name = choose("nf4_matmul", implementation, default_order(),
                lambda n: unsupported_reason(n, k=k, block_size=block_size,
                                             block_sizes=block_sizes, interpret=interpret))
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)  # one canonical [M, K] shape for every implementation
  if name == "reference":
    y = nf4_matmul_reference(x2, codes, absmax, block_size)
  elif name == "xla":
    y = nf4_matmul_xla(x2, codes, absmax, block_size=block_size)
  else:
    y = pallas_gpu.nf4_matmul_pallas_gpu(x2, codes, absmax, block_size=block_size,
                                         block_sizes=block_sizes, interpret=interpret)
  return y.reshape(lead + (codes.shape[1],))
