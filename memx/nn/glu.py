"""BitGLU: the MatMul-free LM's channel mixer, a SwiGLU whose projections are BitLinear.

As ridgerchu/matmulfreellm's `HGRNBitMLP`: one BitLinear d → 2f gives gate and up, y =
BitLinear_f→d(silu(gate) ⊙ up). With ternary weights every matmul is additions only.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.models.config import ModelConfig
from memx.nn.bitlinear import BitLinear
from memx.parallel.axes import EMBED, MLP


class BitGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, std = cfg.d_model, cfg.ff_dim, cfg.init_std
    kw = {"param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
          "eps": cfg.norm_eps, "quantize": cfg.ternary, "rngs": rngs}
    self.ff_dim = f
    self.w_gate_up = BitLinear(d, 2 * f, axes=(EMBED, MLP), std=std, **kw)
    self.w_down = BitLinear(f, d, axes=(MLP, EMBED), std=std / (2 * cfg.n_layers) ** 0.5, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The backward pass keeps x and gate/up; silu(gate) ⊙ up and the down projection's
    norm and quantizers are recomputed (`jax.checkpoint`), so no [B, T, f] product is kept."""

    def down(gu, *params):
      gate, up = gu[..., :self.ff_dim], gu[..., self.ff_dim:]
      h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gu.dtype)
      return self.w_down.apply(h, *params)

    return jax.checkpoint(down)(self.w_gate_up(x), *self.w_down.params())
