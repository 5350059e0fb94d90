"""cuDNN fused attention through `jax.nn.dot_product_attention(implementation="cudnn")`.

Covers what cuDNN's flash kernels express without an explicit mask tensor: no mask, causal,
and a causal left window (sliding_window_length = window_left + 1), with GQA, bf16/fp16. Anything
else (sinks, per-head or block-sparse masks, q_offset, packed segments) goes to pallas_gpu.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp

from memx.kernels._dispatch import gpu_backend
from memx.kernels.attention.mask import Mask
from memx.kernels.attention.reference import SegmentIds
from memx.typing import Array, Float


def _window(mask: Mask) -> tuple[int, int] | None:
  """cuDNN local_window_size for a head-uniform mask it supports (assumes unsupported() passed)."""
  if mask.window_left is None:
    return None
  return (mask.window_left, 0)


def _is_causal(mask: Mask) -> bool:
  # Without a causal flag, a right window of 0 is the same rule as causal.
  return mask.causal or mask.window_right == 0


def unsupported_reason(q, k, mask: Mask, segment_ids) -> str | None:
  """Why cuDNN cannot serve these inputs, or None when it can."""
  if not gpu_backend():
    return "needs an NVIDIA GPU backend (cuDNN)"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN flash attention takes bf16/fp16, got {q.dtype}"
  d = q.shape[-1]
  if d % 8 or (d > 128 and not _hopper_or_later()) or d > 256:
    return f"head dim {d} must be a multiple of 8 and <= 128 (256 on Hopper)"
  if mask.num_heads is not None:
    return "per-head masks are not expressible in cuDNN"
  if mask.block_sparse is not None:
    return "block-sparse layouts are not expressible in cuDNN"
  if mask.n_sink:
    return "attention sinks are not expressible in cuDNN"
  if mask.q_offset:
    return "q_offset (decode / chunked prefill) is not expressible in cuDNN"
  if segment_ids is not None:
    return "packed segment ids are not exposed by jax.nn.dot_product_attention"
  causal = _is_causal(mask)
  if not causal and mask.window_left is not None:
    return "cuDNN supports a left window only together with causal masking"
  if not causal and mask.window_right is not None:
    return "cuDNN supports a right window only as causal (window_right=0)"
  if (causal or mask.window_left is not None) and q.shape[1] != k.shape[1]:
    # jax's cuDNN causal mask is top-left aligned; memx's is too at q_offset=0, but keep cuDNN
    # to T == S here until the T != S alignment is checked on hardware.
    return "causal/windowed cuDNN attention is only dispatched for T == S"
  return None


def _hopper_or_later() -> bool:
  try:
    return float(jax.devices()[0].compute_capability) >= 9.0
  except Exception:  # noqa: BLE001
    return False


def attention_cudnn(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G K"],
    *,
    mask: Mask,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H K"]:
  """cuDNN flash attention for the masks `unsupported_reason` accepts; output in q.dtype."""
  del segment_ids  # unsupported_reason rejects them
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=_is_causal(mask), local_window_size=_window(mask),
      implementation="cudnn")
