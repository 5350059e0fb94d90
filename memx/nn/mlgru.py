"""MLGRU: the MatMul-free LM's token mixer (Zhu et al. 2024, §3.3.1; HGRN, Qin et al. 2023).

  f_t = lb + (1 - lb) · σ(x_t W_f)        forget gate with a learned per-layer lower bound lb
  c_t = SiLU(x_t W_c)                     candidate
  h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ c_t    element-wise recurrence (memx.kernels.linear_scan)
  g_t = σ(x_t W_g)                        output gate
  o_t = (g_t ⊙ RMSNorm(h_t)) W_o

Every projection is a BitLinear (ternary weights, int8 activations; full precision with
model.ternary=False). The lower bound comes from the model (`lower_bounds`): as in
ridgerchu/matmulfreellm's `HGRNBitModel`, a [L, D] parameter is softmaxed over layers and
cumulatively summed, minus layer 0's share, so layer 0 has lb = 0 (free to forget) and deeper
layers are pushed towards long memory. The decode state is h [B, D] per layer (float32).

Differences from the reference code, kept deliberately: the output gate is σ as in the paper's
eq. (the code uses a swish-gated RMSNorm), and the inner width equals d_model (its
expand_ratio = 1 default). Under sequence parallelism the scan runs per device and the devices
exchange one [B, D] state each (`memx.parallel.sequence_scan.sequence_map`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels.norms import rms_norm_reference
from memx.models.config import ModelConfig
from memx.nn._params import ones
from memx.nn._state import check_state
from memx.nn.bitlinear import BitLinear
from memx.parallel.axes import BATCH, EMBED, MLP, SEQ
from memx.parallel.sequence_scan import sequence_map
from memx.typing import Array, Float, Int

_SCAN_IMPLS = ("reference", "xla", "pallas_gpu")


def lower_bounds(logits: Float[Array, "L D"]) -> Float[Array, "L D"]:
  """Per-layer forget-gate lower bounds: cumsum(softmax over layers) minus layer 0's share."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=0)
  return jnp.cumsum(p, axis=0) - p[:1]


class MLGRU(nnx.Module):
  """MLGRU token mixer; x [B, T, D] → [B, T, D]."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    del layer
    d, std = cfg.d_model, cfg.init_std
    kw = {"param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
          "eps": cfg.norm_eps, "quantize": cfg.ternary, "rngs": rngs}
    self.cfg = cfg
    # The recurrence width is named MLP (like a feed-forward hidden layer): it is element-wise,
    # so tensor parallelism may split it, and the in/out dims must not share one logical name.
    self.w_f = BitLinear(d, d, axes=(EMBED, MLP), std=std, **kw)
    self.w_c = BitLinear(d, d, axes=(EMBED, MLP), std=std, **kw)
    self.w_g = BitLinear(d, d, axes=(EMBED, MLP), std=std, **kw)
    self.h_norm = ones((d,), (MLP,), dtype=cfg.param_dtype)
    self.w_o = BitLinear(d, d, axes=(MLP, EMBED), std=std / (2 * cfg.n_layers) ** 0.5, **kw)

  def _gates(self, f_pre, c_pre, lower_bound):
    """(decay f, input (1 - f) ⊙ c) in float32 from the two projections' outputs."""
    f = jax.nn.sigmoid(f_pre.astype(jnp.float32))
    if lower_bound is not None:
      lb = lower_bound.astype(jnp.float32).reshape((1,) * (f.ndim - 1) + (-1,))
      f = lb + (1.0 - lb) * f
    c = jax.nn.silu(c_pre.astype(jnp.float32))
    return f, (1.0 - f) * c

  def _output(self, g_pre, h, h_norm, o_params, dtype):
    g = jax.nn.sigmoid(g_pre.astype(jnp.float32))
    hn = rms_norm_reference(h.astype(jnp.float32), h_norm, self.cfg.norm_eps)
    return self.w_o.apply((g * hn).astype(dtype), *o_params)

  def __call__(self, x: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
               *, lower_bound: Float[Array, " D"] | None = None, return_state: bool = False,
               state: dict[str, jax.Array] | None = None):
    """Parallel form (one linear_scan); with return_state also the decode state. state: a
    decode state the sequence continues from (chunked prefill), else zeros.

    Memory: the backward pass keeps x and the three input projections' outputs per layer. The
    gates, the scan, the normed output and the output projection are recomputed from them
    (`jax.checkpoint` over `core`): element-wise work and one [T, D] scan, against the
    [B, T, D] tensors of a dozen intermediates autodiff would otherwise keep. Under sequence
    parallelism the recomputed scan repeats its state exchange ([B, D] per device and round).
    """
    f_pre, c_pre, g_pre = self.w_f(x), self.w_c(x), self.w_g(x)
    impl = self.cfg.ssm.impl if self.cfg.ssm.impl in _SCAN_IMPLS else None
    if state is not None:
      check_state("MLGRU", state, lambda: self.init_cache(x.shape[0]))
    h0 = None if state is None else state["state"]

    def mix(shard, f, b, seg, h0):
      h, final = shard.linear_scan(f, b, h0, segment_ids=seg, implementation=impl,
                                   final_state=return_state)
      return (h, final) if return_state else h

    def core(f_pre, c_pre, g_pre, lower_bound, segment_ids, h0, h_norm, o_params):
      f, b = self._gates(f_pre, c_pre, lower_bound)
      hs = (BATCH, SEQ, MLP)
      out = sequence_map(mix, f, b, segment_ids, h0, in_axes=(hs, hs, (BATCH, SEQ), (BATCH, MLP)),
                         out_axes=(hs, (BATCH, MLP)) if return_state else hs)
      h, final = out if return_state else (out, None)
      return self._output(g_pre, h, h_norm, o_params, x.dtype), final

    out, final = jax.checkpoint(core)(f_pre, c_pre, g_pre, lower_bound, segment_ids, h0,
                                      self.h_norm[...], self.w_o.params())
    return (out, {"state": final}) if return_state else out

  def init_cache(self, batch: int) -> dict[str, jax.Array]:
    return {"state": jnp.zeros((batch, self.cfg.d_model), jnp.float32)}

  def step(self, x_t: Float[Array, "B D"], cache: dict[str, jax.Array], *,
           lower_bound: Float[Array, " D"] | None = None):
    """Recurrent form for one token: (y_t [B, D], new cache)."""
    f, b = self._gates(self.w_f(x_t), self.w_c(x_t), lower_bound)
    h = f * cache["state"] + b
    out = self._output(self.w_g(x_t), h, self.h_norm[...], self.w_o.params(), x_t.dtype)
    return out, {"state": h}

  def steps(self, x: Float[Array, "B C D"], cache: dict[str, jax.Array], *,
            lower_bound: Float[Array, " D"] | None = None):
    """`step` over C tokens → (y [B, C, D], the state after each token, [C, B, D]): the
    projections on the C tokens at once, the recurrence token by token."""
    f, b = self._gates(self.w_f(x), self.w_c(x), lower_bound)

    def body(h, fb):
      h = fb[0] * h + fb[1]
      return h, h

    _, hs = jax.lax.scan(body, cache["state"], (jnp.swapaxes(f, 0, 1), jnp.swapaxes(b, 0, 1)))
    out = self._output(self.w_g(x), jnp.swapaxes(hs, 0, 1), self.h_norm[...],
                       self.w_o.params(), x.dtype)
    return out, {"state": hs}
