"""Grouped-query self-attention with RoPE; the math is memx.kernels.attention.attention."""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels.attention import MASK_VALUE, Mask, elastic_mask
from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, param
from memx.nn.lora import linear
from memx.nn.rope import apply_rope
from memx.parallel.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, SEQ
from memx.parallel.constrain import constrain
from memx.parallel.sequence import sharded_attention


def layer_mask(cfg: ModelConfig, layer: int, length: int | None = None) -> Mask:
  """The layer's mask at sequence length `length` (keys visible to the last query).

  Causal for every layer; windowed (with sinks) for the layers the config selects; per-head
  length-elastic spans (MoA) for layers of a sparse plan, which need `length`.
  """
  if cfg.attn_plan is not None and cfg.attn_plan[layer] is not None:
    if length is None:
      raise ValueError(f"layer {layer} follows a sparse plan: its mask needs the sequence length")
    return elastic_mask(cfg.attn_plan[layer], length)
  if cfg.is_windowed(layer):
    # Sinks past the sequence's end are no keys: clipped, so a sequence shorter than the sink
    # count runs (as decoding's prefix masks do).
    sinks = cfg.attn_sinks if length is None else min(cfg.attn_sinks, length)
    return Mask(causal=True, window_left=cfg.attn_window, n_sink=sinks)
  return Mask(causal=True)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    std, pd = cfg.init_std, cfg.param_dtype
    self.cfg = cfg
    self.layer = layer
    self.wq = param(rngs, (d, h, k), (EMBED, HEADS, HEAD_DIM), std=std, dtype=pd)
    self.wk = param(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), std=std, dtype=pd)
    self.wv = param(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), std=std, dtype=pd)
    # Output projection scaled down by depth (GPT-2) so the residual stream starts O(1).
    self.wo = param(rngs, (h, k, d), (HEADS, HEAD_DIM, EMBED),
                    std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)

  def mask(self, length: int) -> Mask:
    """The mask this layer uses on a sequence of `length` tokens."""
    return layer_mask(self.cfg, self.layer, length)

  def qkv(self, x: jax.Array, positions: jax.Array):
    """Projected, RoPE-rotated q [B, T, H, K], k and v [B, T, G, K] in the compute dtype."""
    dt = DTYPES[self.cfg.compute_dtype]
    q = linear(x, self.wq, 1, dt)
    k = linear(x, self.wk, 1, dt)
    v = linear(x, self.wv, 1, dt)
    q = apply_rope(q, positions, theta=self.cfg.rope_theta)
    k = apply_rope(k, positions, theta=self.cfg.rope_theta)
    return q, k, v

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None, score_bias: jax.Array | None = None
               ) -> jax.Array:
    """x [B, T, D] in the compute dtype → [B, T, D].

    score_bias: optional [B, H, T, T] added to the attention logits. For profiling only
    (memx.sparse.profile differentiates the loss with respect to it): the layer then runs
    dense explicit attention and sows its probabilities as nnx.Intermediate "attn_probs".
    """
    q, k, v = self.qkv(x, positions)
    if score_bias is not None:
      out, probs = probe_attention(q, k, v, self.mask(x.shape[1]), segment_ids, score_bias)
      self.sow(nnx.Intermediate, "attn_probs", probs)
      return self.out(out)
    # Plain kernel call unless the active rules split SEQ (then ring / all-to-all attention).
    q = constrain(q, (BATCH, SEQ, HEADS, HEAD_DIM))
    k = constrain(k, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    v = constrain(v, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    out = sharded_attention(q, k, v, mask=self.mask(x.shape[1]), segment_ids=segment_ids,
                    implementation=self.cfg.attn_impl)
    return self.out(out)

  def out(self, o: jax.Array) -> jax.Array:
    """The output projection: per-head outputs [..., H, K] → [..., D]."""
    return linear(o, self.wo, 2, DTYPES[self.cfg.compute_dtype])


def probe_attention(q, k, v, mask: Mask, segment_ids, bias):
  """Dense attention with an additive logit bias; returns (out [B, T, H, K], probs [B, H, T, S]).

  The same math as `attention_reference` (fp32 softmax, masked pairs at MASK_VALUE, GQA by
  head groups) with the bias added to the visible logits, so d loss / d bias is the gradient
  with respect to the attention logits.
  """
  b, t, h, dk = q.shape
  s, g = k.shape[1], k.shape[2]
  kr = jnp.repeat(k, h // g, axis=2)
  vr = jnp.repeat(v, h // g, axis=2)
  scores = jnp.einsum("bthk,bshk->bhts", q, kr, preferred_element_type=jnp.float32) * dk ** -0.5
  if mask.num_heads is None:
    visible = jnp.broadcast_to(mask.dense(t, s)[None, None], (b, h, t, s))
  else:
    visible = jnp.broadcast_to(jnp.stack([mask.dense(t, s, head=i) for i in range(h)])[None],
                               (b, h, t, s))
  if segment_ids is not None:
    visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  scores = jnp.where(visible, scores + bias.astype(jnp.float32), MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bhts,bshk->bthk", probs.astype(v.dtype), vr,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return out, probs
