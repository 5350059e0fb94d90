"""attention(): the one entry point layers call; validates inputs and picks an implementation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from memx.kernels._dispatch import NEEDS_GPU, choose
from memx.kernels.attention import cudnn as cudnn_impl
from memx.kernels.attention.config import BlockSizes
from memx.kernels.attention.mask import CAUSAL, Mask
from memx.kernels.attention.pallas_gpu import attention_pallas_gpu
from memx.kernels.attention.reference import SegmentIds, attention_reference, split_segment_ids
from memx.kernels.attention.xla import attention_xla
from memx.typing import Array, Float

Implementation = Literal["reference", "xla", "pallas_gpu", "cudnn"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu", "cudnn")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  if cudnn_impl.gpu_backend():
    return ("cudnn", "pallas_gpu", "xla")
  return ("xla",)


def _check_inputs(q, k, v, mask: Mask, segment_ids) -> None:
  """ValueError for bad input, before any tracing of a kernel."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"attention: {name} must be [B, T|S, H, D]; got shape "
                       f"{getattr(x, 'shape', None)}")
  if k.shape != v.shape:
    raise ValueError(f"attention: k {k.shape} and v {v.shape} must have the same shape "
                     f"[B, S, Hkv, D]")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"attention: batch sizes differ: q {q.shape}, k {k.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"attention: q and k head dims differ ({q.shape[3]} vs {k.shape[3]})")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: query heads ({q.shape[2]}) must be a multiple of kv heads "
                     f"({k.shape[2]})")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
  if q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"attention: dtype {q.dtype} is not supported; use float32, bfloat16 or "
                     f"float16")
  if not isinstance(mask, Mask):
    raise ValueError(f"attention: mask must be a memx Mask, got {type(mask).__name__}")
  b, t, h, _ = q.shape
  s = k.shape[1]
  if 0 in q.shape or 0 in k.shape:
    raise ValueError(f"attention: empty inputs (q {q.shape}, k {k.shape})")
  mask.check_fits(t, s, h)
  if segment_ids is not None:
    if isinstance(segment_ids, tuple | list) and len(segment_ids) != 2:
      raise ValueError("attention: segment_ids must be one [B, T] array or a (q_ids, kv_ids) "
                       "pair")
    if not isinstance(segment_ids, tuple | list) and t != s:
      raise ValueError(f"attention: one segment_ids array needs T == S (got T={t}, S={s}); "
                       f"pass (q_ids [B, T], kv_ids [B, S])")
    q_ids, kv_ids = split_segment_ids(segment_ids)
    for name, x, want in (("q", q_ids, (b, t)), ("kv", kv_ids, (b, s))):
      if tuple(getattr(x, "shape", ())) != want:
        raise ValueError(f"attention: {name} segment ids must have shape {want}, got "
                         f"{getattr(x, 'shape', None)}")
      if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"attention: segment ids must be integers, got {x.dtype}")


def unsupported_reason(name: str, q, k, mask: Mask, segment_ids, interpret: bool
                       ) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  if name in ("reference", "xla"):
    return None
  if name == "pallas_gpu":
    if not interpret and not cudnn_impl.gpu_backend():
      return NEEDS_GPU
    if q.shape[-1] > 256:
      return f"head dim {q.shape[-1]} > 256 does not fit the kernel's register tiles"
    return None
  if name == "cudnn":
    return cudnn_impl.unsupported_reason(q, k, mask, segment_ids)
  raise NotImplementedError(f"attention: unknown implementation {name!r}; available: "
                            f"{IMPLEMENTATIONS}")


def _run(name, q, k, v, mask, segment_ids, scale, block_sizes, interpret):
  if name == "reference":
    return attention_reference(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale)
  if name == "xla":
    return attention_xla(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale,
                         block_sizes=block_sizes)
  if name == "pallas_gpu":
    return attention_pallas_gpu(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale,
                                block_sizes=block_sizes, interpret=interpret)
  return cudnn_impl.attention_cudnn(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale)


def attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G K"],
    *,
    mask: Mask = CAUSAL,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H K"]:
  """Softmax attention softmax(q kᵀ · scale + mask) v with a structured mask.

  Args:
    q: queries [B, T, Hq, D].
    k: keys [B, S, Hkv, D]; Hq must be a multiple of Hkv (GQA: query head h reads kv head
      h // (Hq // Hkv)).
    v: values [B, S, Hkv, D].
    mask: which (query, key) pairs are visited: causal, windows, sinks, per-head entries,
      block-sparse layout, q_offset (see `Mask`).
    segment_ids: packed sequences: one [B, T] int array (T == S) or (q_ids [B, T],
      kv_ids [B, S]); tokens attend only within their own segment.
    scale: logit scale, a Python float (static); default D ** -0.5.
    implementation: None dispatches by backend: on an NVIDIA GPU cuDNN when it covers the
      mask, else pallas_gpu, else xla; elsewhere xla. A single name forces that
      implementation and raises if it cannot serve the inputs; a sequence is tried in order,
      warning on every skip.
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).
    block_sizes: tiles for xla / pallas_gpu (`BlockSizes`); default per implementation.

  Returns:
    [B, T, Hq, D] in q.dtype. Every implementation computes scores and softmax statistics in
    fp32 (bf16 inputs feed the matmuls as bf16). Rows that see no key are zeros.

  Raises:
    ValueError: malformed inputs (shapes, dtypes, head counts, per-head mask lengths, sinks
      out of range, a block-sparse layout that does not fit the sizes or the block sizes).
    NotImplementedError: an explicitly requested implementation cannot serve the inputs (the
      message says why), or no implementation in a requested sequence can.
  """
  _check_inputs(q, k, v, mask, segment_ids)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"attention: block_sizes must be a BlockSizes, got {block_sizes!r}")
  if block_sizes is not None:
    # Checks tiles against a block-sparse layout now, with a ValueError, not inside a trace.
    block_sizes.fit(q.shape[1], k.shape[1], mask, explicit=True)
  if scale is not None:
    if isinstance(scale, jax.core.Tracer) or isinstance(scale, bool):
      raise ValueError("attention: scale must be a Python number known when tracing (it is "
                       f"static: it shapes the kernels); got {type(scale).__name__}")
    try:
      scale = float(np.asarray(scale))
    except (TypeError, ValueError):
      raise ValueError(f"attention: scale must be a number; got {scale!r}") from None
    if not math.isfinite(scale):
      raise ValueError(f"attention: scale must be finite; got {scale}")

  def reason(name):
    if name not in IMPLEMENTATIONS:
      raise NotImplementedError(f"attention: unknown implementation {name!r}; available: "
                                f"{IMPLEMENTATIONS}")
    return unsupported_reason(name, q, k, mask, segment_ids, interpret)

  # Default dispatch: passing over cuDNN (first on GPU) for a mask it cannot express is the
  # rule, not a fallback; skipping the kernel meant for this backend is, and says so.
  name = choose("attention", implementation, default_order(), reason,
                silent_default_skip=lambda i, n: i == 0 and n == "cudnn")
  return _run(name, q, k, v, mask, segment_ids, scale, block_sizes, interpret)
