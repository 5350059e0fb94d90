"""decode_attention: one query position per row over a quantized KV cache (forward only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from memx.kernels._dispatch import NEEDS_GPU, choose, gpu_backend
from memx.kernels.attention.chunk import visible
from memx.kernels.attention.mask import Mask
from memx.kernels.kv_quant import pallas_gpu
from memx.kernels.kv_quant.cache import QuantCache
from memx.kernels.kv_quant.reference import decode_attention_reference
from memx.typing import Array, Float

IMPLEMENTATIONS: tuple[str, ...] = ("reference", "pallas_gpu")
# Programs to aim for when choosing the split count: two per SM of an H100 (132 SMs).
TARGET_PROGRAMS = 264


def default_order() -> tuple[str, ...]:
  return ("pallas_gpu", "reference") if gpu_backend() else ("reference",)


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def unsupported_reason(name: str, q, cache: QuantCache, mask: Mask, interpret: bool
                       ) -> str | None:
  if name not in IMPLEMENTATIONS:
    raise NotImplementedError(f"decode_attention: unknown implementation {name!r}; available: "
                              f"{IMPLEMENTATIONS}")
  if name == "reference":
    return None
  if not interpret and not gpu_backend():
    return NEEDS_GPU
  if isinstance(mask.window_left, tuple) or isinstance(mask.n_sink, tuple) \
      or isinstance(mask.window_right, tuple):
    return "per-head windows or sinks are not in the kernel (the reference serves them)"
  spec, d = cache.spec, q.shape[-1]
  width, vg = d * spec.bits // 8, spec.value_group(d)
  if not (spec.group >= 16 and _pow2(spec.group) and width >= 16 and _pow2(width)
          and vg >= 16 and _pow2(vg) and width % vg == 0):
    return (f"the kernel needs a power-of-two key group >= 16 (got {spec.group}), a power-of-two "
            f"code row of >= 16 bytes (head_dim {d} at {spec.bits} bits: {width}) and value "
            f"groups of >= 16 channels within one field (got {vg})")
  return None


def _check_inputs(q, cache, pos, mask) -> None:
  if not isinstance(cache, QuantCache):
    raise ValueError(f"decode_attention: cache must be a QuantCache, got "
                     f"{type(cache).__name__}")
  b, _, g, d = cache.k_res.shape
  if getattr(q, "ndim", None) != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] % g:
    raise ValueError(f"decode_attention: q must be [B, H, K] = [{b}, a multiple of {g} KV "
                     f"heads, {d}] for this cache; got shape {getattr(q, 'shape', None)}")
  if q.dtype != cache.dtype:
    raise ValueError(f"decode_attention: q is {q.dtype}, the cache {cache.dtype}")
  if not isinstance(mask, Mask) or not mask.causal or mask.block_sparse is not None \
      or mask.q_offset:
    raise ValueError(f"decode_attention: mask must be a causal memx Mask (windows and sinks, "
                     f"uniform or per head) without block-sparse layout or q_offset; got {mask}")
  mask.check_heads(q.shape[1])
  if jnp.ndim(pos) != 0 or not jnp.issubdtype(jnp.result_type(pos), jnp.integer):
    raise ValueError(f"decode_attention: pos must be an integer scalar, got {pos!r}")
  if not isinstance(pos, jax.core.Tracer) and not 0 <= int(pos) < cache.max_len:
    raise ValueError(f"decode_attention: pos {int(pos)} outside the cache's 0..{cache.max_len - 1}")


def default_splits(batch: int, kv_heads: int, groups: int) -> int:
  """Split-K count: enough programs to fill the GPU, each with at least 4 of the `groups` key
  groups a step visits."""
  want = math.ceil(TARGET_PROGRAMS / (batch * kv_heads))
  return max(1, min(want, max(groups, 0) // 4))


def decode_attention(
    q: Float[Array, "B H K"],
    cache: QuantCache,
    pos,
    *,
    mask: Mask,
    scale: float | None = None,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
    splits: int | None = None,
) -> Float[Array, "B H K"]:
  """Attention of the query at position pos (int32 scalar, may be traced; the cache already
  holds its key and value) over `cache`, with the causal `mask` of the whole sequence.

  implementation: None dispatches (pallas_gpu on NVIDIA GPUs where the mask and format allow,
  else reference); a name forces one. splits: the kernel's split-K count (default: enough
  programs to fill an H100). Returns [B, H, K] in q.dtype. Forward only.
  """
  _check_inputs(q, cache, pos, mask)
  name = choose("decode_attention", implementation, default_order(),
                lambda n: unsupported_reason(n, q, cache, mask, interpret))
  if name == "reference":
    return decode_attention_reference(q, cache, pos, mask=mask, scale=scale)
  b, h, d = q.shape
  g = cache.k_res.shape[2]
  r, group = h // g, cache.spec.group
  scale = d ** -0.5 if scale is None else scale
  rows = max(pallas_gpu.MIN_ROWS, 1 << (r - 1).bit_length())
  qg = q.reshape(b, g, r, d)
  n_groups = cache.k_codes.shape[1] // group - cache.spec.residual // group
  if mask.window_left is not None:  # the groups a window visits (its sinks: split 0's)
    n_groups = min(n_groups, mask.window_left // group + 2)
  splits = default_splits(b, g, n_groups) if splits is None else splits
  if not (isinstance(splits, int) and splits >= 1):
    raise ValueError(f"decode_attention: splits must be an int >= 1, got {splits!r}")
  left = mask.window_left
  acc, m, denom = pallas_gpu.quantized_part(
      jnp.pad(qg, ((0, 0), (0, 0), (0, rows - r), (0, 0))), cache, pos, left=left,
      sink=mask.n_sink, scale=scale, splits=splits, interpret=interpret)
  acc, m, denom = acc[..., :r, :], m[..., :r], denom[..., :r]             # [B, G, S, R(, K)]
  # The full-precision ring: positions exact_from(pos) .. pos, one per slot.
  pos = jnp.asarray(pos, jnp.int32)
  ring = cache.spec.ring
  res_pos = cache.ring_positions(cache.exact_from(pos))
  vis = ((res_pos <= pos)[None] & visible(mask, h, pos, res_pos)).reshape(g, r, ring)
  c = scale * pallas_gpu.LOG2E
  sr = jnp.einsum("bgrk,bigk->bgri", qg, cache.k_res, preferred_element_type=jnp.float32) * c
  sr = jnp.where(vis[None], sr, pallas_gpu.NEG)
  mr = jnp.max(sr, axis=-1)
  pr = jnp.where(vis[None], jnp.exp2(sr - mr[..., None]), 0.0)
  acc_r = jnp.einsum("bgri,bigk->bgrk", pr.astype(q.dtype), cache.v_res,
                     preferred_element_type=jnp.float32)
  # Merge the splits and the residual (base-2 log-sum-exp).
  m_all = jnp.concatenate([m, mr[:, :, None]], axis=2)
  l_all = jnp.concatenate([denom, jnp.sum(pr, axis=-1)[:, :, None]], axis=2)
  acc_all = jnp.concatenate([acc, acc_r[:, :, None]], axis=2)
  top = jnp.max(m_all, axis=2, keepdims=True)
  wts = jnp.exp2(m_all - top)
  out = jnp.sum(acc_all * wts[..., None], axis=2) / jnp.sum(l_all * wts, axis=2)[..., None]
  return out.reshape(b, h, d).astype(q.dtype)
