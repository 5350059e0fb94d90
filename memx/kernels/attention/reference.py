"""Dense softmax attention: the oracle every other implementation is tested against.

out = softmax(q kᵀ · scale + mask) v (Vaswani et al. 2017, eq. 1), with the mask from
`Mask.dense` (per head when the mask is per-head) and optional segment ids.
"""

import jax
import jax.numpy as jnp
from einops import rearrange

from memx.kernels.attention.mask import Mask
from memx.typing import Array, Float, Int

# Large finite negative: exp() underflows to exactly 0 and fully masked rows stay NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

SegmentIds = Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]]


def split_segment_ids(segment_ids: SegmentIds | None):
  """(q_ids [B, T], kv_ids [B, S]) from one shared [B, T] array or a pair; (None, None)."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, tuple | list):
    q_ids, kv_ids = segment_ids
    return q_ids, kv_ids
  return segment_ids, segment_ids


def attention_reference(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G V"],
    *,
    mask: Mask,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H V"]:
  """Materialises the [B, H, T, S] scores. fp32 softmax; output in q.dtype.

  Args:
    q: queries [B, T, H, K].
    k: keys [B, S, G, K]; H must be a multiple of G (GQA: query head h reads kv head
      h // (H // G)).
    v: values [B, S, G, V].
    mask: which pairs are visited (see `Mask`).
    segment_ids: one [B, T] array when T == S, or a (q_ids [B, T], kv_ids [B, S]) pair; tokens
      attend only within their own segment.
    scale: logit scale; default K ** -0.5.

  Returns:
    [B, T, H, V] in q.dtype. Scores and softmax are fp32; the probabilities are cast to v.dtype
    before the PV product (what the fused kernels do). Rows with no visible key are zeros.
  """
  b, t, h, dk = q.shape
  s, g = k.shape[1], k.shape[2]
  scale = dk ** -0.5 if scale is None else scale
  q_BxGxRxTxK = rearrange(q, "b t (g r) k -> b g r t k", g=g)
  scores = jnp.einsum("bgrtk,bsgk->bgrts", q_BxGxRxTxK, k,
                      preferred_element_type=jnp.float32) * scale
  if mask.num_heads is None:
    visible_HxTxS = mask.dense(t, s)[None]
  else:
    mask.check_heads(h)
    visible_HxTxS = jnp.stack([mask.dense(t, s, head=i) for i in range(h)])
  visible_BxHxTxS = jnp.broadcast_to(visible_HxTxS[None], (b, visible_HxTxS.shape[0], t, s))
  q_seg, kv_seg = split_segment_ids(segment_ids)
  if q_seg is not None:
    same_BxTxS = q_seg[:, :, None] == kv_seg[:, None, :]
    visible_BxHxTxS = visible_BxHxTxS & same_BxTxS[:, None]
  visible_BxHxTxS = jnp.broadcast_to(visible_BxHxTxS, (b, h, t, s))
  visible = rearrange(visible_BxHxTxS, "b (g r) t s -> b g r t s", g=g)
  scores = jnp.where(visible, scores, MASK_VALUE)
  # Softmax in fp32; rows with no visible key are zeroed rather than left uniform.
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bgrts,bsgv->bgrtv", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return rearrange(out, "b g r t v -> b t (g r) v").astype(q.dtype)
