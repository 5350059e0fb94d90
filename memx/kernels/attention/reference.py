"""Dense softmax attention: the oracle every other implementation is tested against.

softmax(q kᵀ · scale + mask) v, with the mask from `Mask.dense` and optional segment ids.
"""

import jax
import jax.numpy as jnp
from einops import rearrange

from memx.kernels.attention.mask import Mask
from memx.typing import Array, Float, Int

# Large finite negative: exp() underflows to exactly 0 and fully masked rows stay NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G V"],
    *,
    mask: Mask,
    segment_ids: Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]] | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H V"]:
  """Materialises the [B, H, T, S] scores. fp32 softmax; output in q.dtype.

  GQA: query head h reads kv head h // (H // G). Rows with no visible key return zeros.
  segment_ids: one [B, T] array when T == S, or a (q_ids, kv_ids) pair; tokens attend only
  within their own segment.
  """
  b, t, h, dk = q.shape
  s, g = k.shape[1], k.shape[2]
  scale = dk ** -0.5 if scale is None else scale
  q_BxGxRxTxK = rearrange(q, "b t (g r) k -> b g r t k", g=g)
  scores = jnp.einsum("bgrtk,bsgk->bgrts", q_BxGxRxTxK, k,
                      preferred_element_type=jnp.float32) * scale
  visible_BxTxS = jnp.broadcast_to(mask.dense(t, s)[None], (b, t, s))
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    visible_BxTxS = visible_BxTxS & (q_seg[:, :, None] == kv_seg[:, None, :])
  visible = visible_BxTxS[:, None, None]
  scores = jnp.where(visible, scores, MASK_VALUE)
  # Softmax in fp32; rows with no visible key are zeroed rather than left uniform.
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bgrts,bsgv->bgrtv", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return rearrange(out, "b g r t v -> b t (g r) v").astype(q.dtype)
