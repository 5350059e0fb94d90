"""Decoder-only Transformer LM: embed → L × (RMSNorm → GQA attention, RMSNorm → SwiGLU) → logits."""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, param
from memx.nn.attention import Attention
from memx.nn.mlp import SwiGLU
from memx.nn.norms import RMSNorm
from memx.parallel.axes import EMBED, VOCAB
from memx.typing import Array, Float, Int

# Which intermediates a rematerialised block keeps for the backward pass.
REMAT_POLICIES = {
    "full": None,  # save only the block input; recompute everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids=None):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))


def _run_block(block: Block, x, positions, segment_ids):
  return block(x, positions, segment_ids)


class TransformerLM(nnx.Module):
  """Token ids [B, T] → next-token logits [B, T, vocab] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), (VOCAB, EMBED), std=cfg.init_std,
                       dtype=cfg.param_dtype)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), (EMBED, VOCAB),
                           std=cfg.d_model ** -0.5, dtype=cfg.param_dtype)
    run = _run_block
    if cfg.remat != "none":
      run = nnx.remat(_run_block, policy=REMAT_POLICIES[cfg.remat])
    self._run_block = run

  def __call__(self, tokens: Int[Array, "B T"], *, positions: Int[Array, "B T"] | None = None,
               segment_ids: Int[Array, "B T"] | None = None) -> Float[Array, "B T V"]:
    cfg = self.cfg
    dt = DTYPES[cfg.compute_dtype]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    for block in self.blocks:
      x = self._run_block(block, x, positions, segment_ids)
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dt),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.unembed[...].astype(dt),
                          preferred_element_type=jnp.float32)
    return logits


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
