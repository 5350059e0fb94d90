"""Grouped-query self-attention with RoPE; the math is memx.kernels.attention.attention."""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels.attention import Mask
from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, param
from memx.nn.rope import apply_rope
from memx.parallel.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, SEQ
from memx.parallel.constrain import constrain
from memx.parallel.sequence import sharded_attention


def layer_mask(cfg: ModelConfig, layer: int) -> Mask:
  """Causal for every layer; windowed (with sinks) for the layers the config selects."""
  if cfg.is_windowed(layer):
    return Mask(causal=True, window_left=cfg.attn_window, n_sink=cfg.attn_sinks)
  return Mask(causal=True)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    std, pd = cfg.init_std, cfg.param_dtype
    self.cfg = cfg
    self.mask = layer_mask(cfg, layer)
    self.wq = param(rngs, (d, h, k), (EMBED, HEADS, HEAD_DIM), std=std, dtype=pd)
    self.wk = param(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), std=std, dtype=pd)
    self.wv = param(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), std=std, dtype=pd)
    # Output projection scaled down by depth (GPT-2) so the residual stream starts O(1).
    self.wo = param(rngs, (h, k, d), (HEADS, HEAD_DIM, EMBED),
                    std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] in the compute dtype → [B, T, D]."""
    dt = DTYPES[self.cfg.compute_dtype]
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dgk->btgk", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dgk->btgk", x, self.wv[...].astype(dt))
    q = apply_rope(q, positions, theta=self.cfg.rope_theta)
    k = apply_rope(k, positions, theta=self.cfg.rope_theta)
    # Plain kernel call unless the active rules split SEQ (then ring / all-to-all attention).
    q = constrain(q, (BATCH, SEQ, HEADS, HEAD_DIM))
    k = constrain(k, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    v = constrain(v, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    out = sharded_attention(q, k, v, mask=self.mask, segment_ids=segment_ids,
                    implementation=self.cfg.attn_impl)
    return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt))
