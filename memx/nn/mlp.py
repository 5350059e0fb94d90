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
    dt = self.compute_dtype
    gate = jax.nn.silu(x @ self.w_gate[...].astype(dt))
    return (gate * (x @ self.w_up[...].astype(dt))) @ self.w_down[...].astype(dt)
