"""Mamba-2 mixer (Dao & Gu 2024, §7.1, Fig. 6 right): parallel (chunked SSD) and recurrent forms.

u → in-projections z, x, B, C, Δ → short causal depthwise conv + SiLU on x, B, C
(memx.kernels.short_conv, the SiLU fused) → SSD
(memx.kernels.ssd.ssd) → gated RMSNorm(y ⊙ silu(z)) → out-projection.

Under sequence parallelism (active rules split SEQ) the conv and the SSD run per device through
`memx.parallel.sequence_scan.sequence_map`: the conv takes the conv_width - 1 tokens before the
device's run from its neighbour (a halo), the SSD scans locally and exchanges one state per
device; the projections and the norm are token-wise and stay outside.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels import save_kernel_results
from memx.kernels.short_conv import causal_conv
from memx.kernels.ssd import BlockSizes, ssd_step
from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, param
from memx.nn._state import check_state
from memx.nn.short_conv import conv_step, last_inputs
from memx.parallel.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, SEQ, STATE
from memx.parallel.sequence_scan import sequence_map
from memx.typing import Array, Float, Int

NORM_EPS = 1e-5  # RMSNormGated's default in state-spaces/mamba


_STATE_KEYS = ("conv_x", "conv_b", "conv_c", "ssm")
# The short conv's implementation follows the SSD's (cfg.ssm.impl); it has no quadratic form.
_CONV_IMPL = {None: None, "reference": "reference", "quadratic": "xla", "xla": "xla",
              "pallas_gpu": "pallas_gpu"}


def _uniform(rngs: nnx.Rngs, shape, bound: float) -> jax.Array:
  return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


def gated_rms_norm(y: Float[Array, "B T H P"], z: Float[Array, "B T H P"],
                   scale: Float[Array, "H P"], groups: int, eps: float = NORM_EPS):
  """RMSNorm(y ⊙ silu(z)) · scale over groups of H/groups heads (norm_before_gate=False)."""
  g = (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32)))
  shape = g.shape
  g = g.reshape(*shape[:-2], groups, -1)
  g = g * jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + eps)
  g = g.reshape(shape) * scale.astype(jnp.float32).reshape((1,) * (len(shape) - 2) + scale.shape)
  return g.astype(y.dtype)


class Mamba2(nnx.Module):
  """Mamba-2 token mixer; x [B, T, D] → [B, T, D].

  Shapes: inner width E·D split into H = E·D/P heads of dim P (cfg.ssm.expand, head_dim), B and
  C of N = cfg.ssm.d_state per group, G = cfg.ssm.n_groups groups shared by H/G heads.

  Initialisation (state-spaces/mamba `Mamba2.__init__`):
    * Δ bias: Δ0 = exp(U(log dt_min, log dt_max)) clamped below at dt_init_floor, stored as its
      inverse softplus Δ0 + log(-expm1(-Δ0)), so softplus(0 + bias) = Δ0 at the start.
    * A: A_log = log U(a_init_min, a_init_max) per head (default (1, 16)); A = -exp(A_log).
    * D = 1 per head. Δ bias, A_log and D stay float32 whatever param_dtype (as upstream keeps
      them fp32 and out of weight decay).
    * conv weights and biases: U(±1/sqrt(conv_width)) (PyTorch Conv1d default, fan-in = width).
    * gated norm scale = 1.
    * in-projections (z, x, B, C, Δ): memx's truncated normal(init_std); out-projection
      init_std / sqrt(2 · n_layers) (upstream: PyTorch Linear default, out_proj rescaled by
      1/sqrt(n_layer) in `_init_weights`).
  Projections are separate parameters (not one fused in_proj) so each carries its logical axes
  and attention → SSM weight transfers (Q → C, K → B, V → x) are plain copies.
  """

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    del layer
    s = cfg.ssm
    d, h, p, g, n, w = cfg.d_model, cfg.ssm_heads, s.head_dim, s.n_groups, s.d_state, s.conv_width
    std, pd = cfg.init_std, cfg.param_dtype
    self.cfg = cfg
    self.w_z = param(rngs, (d, h, p), (EMBED, HEADS, HEAD_DIM), std=std, dtype=pd)
    self.w_x = param(rngs, (d, h, p), (EMBED, HEADS, HEAD_DIM), std=std, dtype=pd)
    self.w_b = param(rngs, (d, g, n), (EMBED, KV_HEADS, STATE), std=std, dtype=pd)
    self.w_c = param(rngs, (d, g, n), (EMBED, KV_HEADS, STATE), std=std, dtype=pd)
    self.w_dt = param(rngs, (d, h), (EMBED, HEADS), std=std, dtype=pd)
    bound = w ** -0.5
    conv = lambda shape, axes: nnx.Param(  # noqa: E731
        _uniform(rngs, shape, bound).astype(DTYPES[pd]), axes=axes)
    self.conv_x = conv((w, h, p), (None, HEADS, HEAD_DIM))
    self.conv_x_bias = conv((h, p), (HEADS, HEAD_DIM))
    self.conv_b = conv((w, g, n), (None, KV_HEADS, STATE))
    self.conv_b_bias = conv((g, n), (KV_HEADS, STATE))
    self.conv_c = conv((w, g, n), (None, KV_HEADS, STATE))
    self.conv_c_bias = conv((g, n), (KV_HEADS, STATE))
    u = jax.random.uniform(rngs.params(), (h,), jnp.float32)
    dt0 = jnp.exp(u * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min))
    dt0 = jnp.maximum(dt0, s.dt_init_floor)
    self.dt_bias = nnx.Param(dt0 + jnp.log(-jnp.expm1(-dt0)), axes=(HEADS,))
    a0 = jax.random.uniform(rngs.params(), (h,), jnp.float32, s.a_init_min, s.a_init_max)
    self.a_log = nnx.Param(jnp.log(a0), axes=(HEADS,))
    self.d = nnx.Param(jnp.ones((h,), jnp.float32), axes=(HEADS,))
    self.norm = nnx.Param(jnp.ones((h, p), DTYPES[pd]), axes=(HEADS, HEAD_DIM))
    self.w_out = param(rngs, (h, p, d), (HEADS, HEAD_DIM, EMBED),
                       std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)

  def _project(self, u):
    cd = DTYPES[self.cfg.compute_dtype]
    z = jnp.einsum("...d,dhp->...hp", u, self.w_z[...].astype(cd))
    x = jnp.einsum("...d,dhp->...hp", u, self.w_x[...].astype(cd))
    b = jnp.einsum("...d,dgn->...gn", u, self.w_b[...].astype(cd))
    c = jnp.einsum("...d,dgn->...gn", u, self.w_c[...].astype(cd))
    dt_raw = jnp.einsum("...d,dh->...h", u, self.w_dt[...].astype(cd))
    return z, x, b, c, dt_raw

  def _dt_and_a(self, dt_raw, dt_bias, a_log):
    # softplus in fp32 keeps Δ > 0 (bf16 would flush small Δ to 0 and stop the decay).
    bias = dt_bias.reshape((1,) * (dt_raw.ndim - 1) + (-1,))
    delta = jax.nn.softplus(dt_raw.astype(jnp.float32) + bias)
    return delta, -jnp.exp(a_log)

  def _output(self, y, z, norm, w_out):
    cd = DTYPES[self.cfg.compute_dtype]
    y = gated_rms_norm(y, z, norm, self.cfg.ssm.n_groups)
    return jnp.einsum("...hp,hpd->...d", y, w_out.astype(cd))

  def _convs(self):
    return ((self.conv_x, self.conv_x_bias), (self.conv_b, self.conv_b_bias),
            (self.conv_c, self.conv_c_bias))

  def __call__(self, u: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
               *, return_state: bool = False, state: dict[str, jax.Array] | None = None):
    """Parallel form. u [B, T, D] in the compute dtype → [B, T, D] (and the decode state).

    state: a decode state (`init_cache`, or a previous call's return_state) the sequence
    continues from: its conv inputs precede the sequence and its SSM state is the initial one
    (chunked prefill; equal to running the concatenated sequence).

    Memory: the backward pass keeps u, the five in-projections' outputs and, from the SSD, its
    output and chunk-entry states (`memx.kernels.save_kernel_results`). The convolutions, the
    activations, Δ, the gated norm and the out-projection's input are recomputed from them
    (`jax.checkpoint` over `core`): element-wise work, against the dozen [B, T, E·D]-sized
    intermediates autodiff would otherwise keep (the shifted conv inputs alone are W of them).
    No matmul and no SSD forward runs twice. Under sequence parallelism the conv halo, the
    state exchange and the output correction (one small einsum) run again.
    """
    s = self.cfg.ssm
    z, x, b, c, dt_raw = self._project(u)
    convs = [p[...] for pair in self._convs() for p in pair]
    blocks = BlockSizes(chunk=s.chunk_size)
    conv_impl = _CONV_IMPL[s.impl]
    if state is not None:
      check_state("Mamba2", state, lambda: self.init_cache(u.shape[0]))
    state_in = (None,) * 4 if state is None else tuple(state[k] for k in _STATE_KEYS)

    def mix(shard, x, b, c, delta, a, d, seg, hx, hb, hc, h0, *convs):
      raw, history = (x, b, c), (hx, hb, hc)
      x, b, c = (shard.with_history(
                     lambda v, sg, h, hs, w=w, bias=bias: causal_conv(
                         v, w, bias, sg, h, hs, activation="silu", implementation=conv_impl),
                     v, s.conv_width - 1, seg, history=hist)
                 for v, hist, w, bias in zip(raw, history, convs[::2], convs[1::2], strict=True))
      y, final = shard.ssd(x, delta, a, b, c, d=d, segment_ids=seg, implementation=s.impl,
                           block_sizes=blocks, final_state=return_state,
                           initial_state=h0)
      if not return_state:
        return y
      keep = s.conv_width - 1
      cache = {f"conv_{k}": last_inputs(shard, v, hist, keep)
               for k, v, hist in zip("xbc", raw, history, strict=True)}
      if seg is not None and keep:
        # The conv window of the last segment holds its own inputs only (as the SSM state
        # restarts at its start): rows from an earlier packed segment are zeros, as at the
        # start of a sequence. History rows belong to the first token's segment.
        tail = last_inputs(shard, seg, jnp.broadcast_to(seg[:, :1], (seg.shape[0], keep)), keep)
        own = (tail == tail[:, -1:])[:, :, None, None]
        cache = {k: jnp.where(own, v, jnp.zeros_like(v)) for k, v in cache.items()}
      cache["ssm"] = final
      return y, cache

    xs, gs = (BATCH, SEQ, HEADS, HEAD_DIM), (BATCH, SEQ, KV_HEADS, STATE)
    conv_axes = [(None, HEADS, HEAD_DIM), (HEADS, HEAD_DIM)] + [(None, KV_HEADS, STATE),
                                                               (KV_HEADS, STATE)] * 2
    state_axes = {"conv_x": (BATCH, None, HEADS, HEAD_DIM),
                  "conv_b": (BATCH, None, KV_HEADS, STATE),
                  "conv_c": (BATCH, None, KV_HEADS, STATE),
                  "ssm": (BATCH, HEADS, HEAD_DIM, STATE)}
    out_axes = (xs, state_axes) if return_state else xs

    def core(x, b, c, dt_raw, z, segment_ids, state_in, dt_bias, a_log, d, norm, w_out,
             *convs):
      delta, a = self._dt_and_a(dt_raw, dt_bias, a_log)
      out = sequence_map(mix, x, b, c, delta, a, d, segment_ids, *state_in, *convs,
                         in_axes=(xs, gs, gs, (BATCH, SEQ, HEADS), (HEADS,), (HEADS,),
                                  (BATCH, SEQ), *(state_axes[k] for k in _STATE_KEYS),
                                  *conv_axes),
                         out_axes=out_axes)
      y, cache = out if return_state else (out, None)
      return self._output(y, z, norm, w_out), cache

    out, cache = jax.checkpoint(core, policy=save_kernel_results)(
        x, b, c, dt_raw, z, segment_ids, state_in, self.dt_bias[...], self.a_log[...],
        self.d[...], self.norm[...], self.w_out[...], *convs)
    return (out, cache) if return_state else out

  def init_cache(self, batch: int) -> dict[str, jax.Array]:
    """The fixed-size decode state: last conv_width-1 inputs of x, B, C and the SSM state."""
    s, cd = self.cfg.ssm, DTYPES[self.cfg.compute_dtype]
    h, p, g, n, w = self.cfg.ssm_heads, s.head_dim, s.n_groups, s.d_state, s.conv_width
    return {"conv_x": jnp.zeros((batch, w - 1, h, p), cd),
            "conv_b": jnp.zeros((batch, w - 1, g, n), cd),
            "conv_c": jnp.zeros((batch, w - 1, g, n), cd),
            "ssm": jnp.zeros((batch, h, p, n), jnp.float32)}

  def _recur(self, cache, x, b, c, delta, a):
    """The token-by-token part of a step: the convolutions' and the SSM's updates."""
    new, outs = {}, []
    for key, v, (w, bias) in zip(("conv_x", "conv_b", "conv_c"), (x, b, c), self._convs(),
                                 strict=True):
      y_conv, new[key] = conv_step(cache[key], v, w[...], bias[...], activation="silu")
      outs.append(y_conv)
    x, b, c = outs
    y, new["ssm"] = ssd_step(cache["ssm"], x, delta, delta * a[None], b, c, self.d[...])
    return y, new

  def step(self, u_t: Float[Array, "B D"], cache: dict[str, jax.Array]):
    """Recurrent form for one token: (y_t [B, D], new cache); equals the parallel form."""
    z, x, b, c, dt_raw = self._project(u_t)
    delta, a = self._dt_and_a(dt_raw, self.dt_bias[...], self.a_log[...])
    y, new = self._recur(cache, x, b, c, delta, a)
    return self._output(y, z, self.norm[...], self.w_out[...]), new

  def steps(self, u: Float[Array, "B C D"], cache: dict[str, jax.Array]):
    """`step` over C tokens → (y [B, C, D], the state after each token, leaves [C, ...]). The
    projections and the output run on the C tokens at once (one read of the weights); the
    convolutions and the SSM update go token by token."""
    z, x, b, c, dt_raw = self._project(u)
    delta, a = self._dt_and_a(dt_raw, self.dt_bias[...], self.a_log[...])

    def body(state, inputs):
      y, state = self._recur(state, *inputs, a)
      return state, (y, state)

    _, (ys, states) = jax.lax.scan(body, cache, tuple(jnp.swapaxes(v, 0, 1)
                                                      for v in (x, b, c, delta)))
    return self._output(jnp.swapaxes(ys, 0, 1), z, self.norm[...], self.w_out[...]), states
