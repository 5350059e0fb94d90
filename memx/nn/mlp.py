"""SwiGLU feed-forward block (Shazeer, 2020): (silu(x W_gate) ⊙ x W_up) W_down."""

import jax
from flax import nnx

from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, param
from memx.nn.lora import linear
from memx.parallel.axes import EMBED, MLP


class SwiGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, std, pd = cfg.d_model, cfg.ff_dim, cfg.init_std, cfg.param_dtype
    self.compute_dtype = DTYPES[cfg.compute_dtype]
    self.w_gate = param(rngs, (d, f), (EMBED, MLP), std=std, dtype=pd)
    self.w_up = param(rngs, (d, f), (EMBED, MLP), std=std, dtype=pd)
    self.w_down = param(rngs, (f, d), (MLP, EMBED), std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The backward pass keeps x and the two [.., f] projections; silu(gate) ⊙ up is
    recomputed (`jax.checkpoint`), as in BitGLU, instead of keeping four more [.., f] tensors.
    Weights may carry LoRA adapters or NF4 bases (memx.nn.lora.linear)."""
    dt = self.compute_dtype
    gate, up = linear(x, self.w_gate, 1, dt), linear(x, self.w_up, 1, dt)
    if isinstance(self.w_down, nnx.Param):
      return jax.checkpoint(_down)(gate, up, self.w_down[...].astype(dt))
    graphdef, state = nnx.split(self.w_down)
    return jax.checkpoint(lambda g, u, s: _down(g, u, nnx.merge(graphdef, s)))(gate, up, state)


def _down(gate, up, w_down):
  """(silu(gate) ⊙ up) · w_down; w_down an array, or an adapted / quantized weight module."""
  h = jax.nn.silu(gate) * up
  if isinstance(w_down, jax.Array):
    return h @ w_down
  return linear(h, w_down, 1, h.dtype)
