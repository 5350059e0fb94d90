"""The oracle of quantized decode attention: the cache read whole (dequantized, the
full-precision ring over the positions it holds), then dense masked scores and an fp32
softmax. It is also the CPU implementation: on a CPU the dequantized temporary costs what a
dense step's reads do."""

import jax
import jax.numpy as jnp

from memx.kernels.attention.chunk import visible
from memx.kernels.attention.mask import Mask
from memx.kernels.attention.reference import MASK_VALUE
from memx.kernels.kv_quant.cache import QuantCache


def decode_attention_reference(q, cache: QuantCache, pos, *, mask: Mask,
                               scale: float | None = None):
  """q [B, H, K] at position pos (int32 scalar) over `cache` → [B, H, K] in q.dtype."""
  b, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  k, v = cache.read(cache.exact_from(pos))
  s, g = k.shape[1:3]
  qg = q.reshape(b, g, h // g, d)
  scores = jnp.einsum("bgrk,bsgk->bgrs", qg, k, preferred_element_type=jnp.float32) * scale
  vis = visible(mask, h, pos, jnp.arange(s)).reshape(g, h // g, s)
  scores = jnp.where(vis[None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrs,bsgk->bgrk", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, h, d).astype(q.dtype)
