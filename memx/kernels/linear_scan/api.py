"""linear_scan(): the one entry point layers call; validates inputs and picks an implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp

from memx.kernels._dispatch import choose, gpu_backend, portable_or_pallas_reason
from memx.kernels.linear_scan.config import BlockSizes
from memx.kernels.linear_scan.pallas_gpu import linear_scan_pallas_gpu
from memx.kernels.linear_scan.reference import linear_scan_reference
from memx.kernels.linear_scan.xla import linear_scan_xla
from memx.typing import Array, Float, Int

Implementation = Literal["reference", "xla", "pallas_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)



def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  return ("pallas_gpu", "xla") if gpu_backend() else ("xla",)


def _check_inputs(a, b, h0, segment_ids) -> None:
  """ValueError for bad input, before anything is traced."""
  for name, x in (("a", a), ("b", b)):
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"linear_scan: {name} must be [B, T, D]; got shape "
                       f"{getattr(x, 'shape', None)}")
  if a.shape != b.shape:
    raise ValueError(f"linear_scan: a {a.shape} and b {b.shape} must have the same shape "
                     f"[B, T, D]")
  if a.shape[1] == 0:
    raise ValueError("linear_scan: the sequence is empty (T = 0)")
  if 0 in a.shape:
    raise ValueError(f"linear_scan: a and b have an empty dimension (shape {a.shape}); B and "
                     "D must be >= 1")
  for name, x in (("a", a), ("b", b)):
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"linear_scan: {name} dtype {x.dtype} is not supported; use float32, "
                       f"bfloat16 or float16")
  bsz, _, d = b.shape
  if h0 is not None and tuple(getattr(h0, "shape", ())) != (bsz, d):
    raise ValueError(f"linear_scan: initial state h0 must have shape [B, D] = {(bsz, d)}, got "
                     f"{getattr(h0, 'shape', None)} (a state returned by a call on other "
                     f"shapes?)")
  if segment_ids is not None:
    if tuple(getattr(segment_ids, "shape", ())) != b.shape[:2]:
      raise ValueError(f"linear_scan: segment_ids must have shape [B, T] = {b.shape[:2]}, got "
                       f"{getattr(segment_ids, 'shape', None)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"linear_scan: segment_ids must be integers, got {segment_ids.dtype}")


def unsupported_reason(name: str, interpret: bool) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  return portable_or_pallas_reason("linear_scan", name, IMPLEMENTATIONS, interpret=interpret,
                                   on_gpu=gpu_backend())


def linear_scan(
    a: Float[Array, "B T D"],
    b: Float[Array, "B T D"],
    h0: Float[Array, "B D"] | None = None,
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"]]:
  """Element-wise gated recurrence h_t = a_t ⊙ h_{t-1} + b_t over [B, T, D].

  Args:
    a: gates [B, T, D].
    b: inputs [B, T, D].
    h0: state before token 0 [B, D] (e.g. the final state of the previous call); default zeros.
    segment_ids: packed sequences [B, T]; the state restarts from zero where the id changes,
      so each segment equals its own separate run. h0 belongs to token 0's segment.
    implementation: None dispatches by backend (pallas_gpu on an NVIDIA GPU, else xla). A
      single name forces that implementation and raises if it cannot serve the inputs; a
      sequence is tried in order, warning on every skip.
    block_sizes: chunk length and channel tile (`BlockSizes`); default per implementation.
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).

  Returns:
    (h [B, T, D] in b.dtype, final state [B, D] in float32 — pass it back as h0 to continue).
    Every implementation runs the recurrence in float32.

  Raises:
    ValueError: malformed inputs (ranks, shapes, dtypes, a state of the wrong shape).
    NotImplementedError: an explicitly requested implementation cannot serve the inputs, or no
      implementation in a requested sequence can.
  """
  _check_inputs(a, b, h0, segment_ids)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"linear_scan: block_sizes must be a BlockSizes, got {block_sizes!r}")
  name = choose("linear_scan", implementation, default_order(),
                lambda n: unsupported_reason(n, interpret))
  if name == "reference":
    return linear_scan_reference(a, b, h0, segment_ids=segment_ids)
  if name == "xla":
    return linear_scan_xla(a, b, h0, segment_ids=segment_ids, block_sizes=block_sizes)
  return linear_scan_pallas_gpu(a, b, h0, segment_ids=segment_ids, block_sizes=block_sizes,
                                interpret=interpret)
