"""SwiGLU feed-forward block (Shazeer, 2020): (silu(x W_gate) ⊙ x W_up) W_down."""

import jax
from flax import nnx

from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, param
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
    recomputed (`jax.checkpoint`), as in BitGLU, instead of keeping four more [.., f] tensors."""
    dt = self.compute_dtype

    def down(gate, up, w_down):
      return (jax.nn.silu(gate) * up) @ w_down

    return jax.checkpoint(down)(x @ self.w_gate[...].astype(dt), x @ self.w_up[...].astype(dt),
                                self.w_down[...].astype(dt))
