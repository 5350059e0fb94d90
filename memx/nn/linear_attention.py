"""Causal linear attention (Katharopoulos et al. 2020) with an optional per-head scalar gate.

o_t = Σ_{s<=t} (Π_{s<j<=t} g_j) (φ(q_t)·φ(k_s)) v_s, computed by the chunked SSD kernel
(memx.kernels.ssd.linear_attention); φ is the identity or elu + 1. The gated variant is GLA with
one gate per head and token (Yang et al. 2024, §4.4's head-wise gate; RetNet with a learned,
data-dependent decay): log g_t = logsigmoid(x_t W_g + b) / 16, the normaliser 16 from GLA so
gates start near 1. Outputs are normalised per head (RMSNorm over the value dim, as GLA and
RetNet do instead of dividing by φ(q)·Σφ(k)), then projected. Under sequence parallelism the
kernel runs per device and the devices exchange one state each
(`memx.parallel.sequence_scan.sequence_map`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels import save_kernel_results
from memx.kernels.ssd import BlockSizes, ssd_step
from memx.models.config import ModelConfig
from memx.nn._params import DTYPES, ones, param
from memx.nn._state import check_state
from memx.parallel.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, SEQ
from memx.parallel.sequence_scan import sequence_map
from memx.typing import Array, Float, Int

GATE_LOGIT_NORMALIZER = 16.0
NORM_EPS = 1e-6


def feature_map(x: jax.Array, kind: str) -> jax.Array:
  """φ(x): "identity", or "elu1" = elu(x) + 1 > 0 (computed in fp32, returned in x.dtype)."""
  if kind == "identity":
    return x
  return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)


class LinearAttention(nnx.Module):
  """Linear-attention token mixer; x [B, T, D] → [B, T, D].

  Heads follow the attention config: H = n_heads query heads of dim K = d_model / n_heads;
  keys and values have n_kv_heads groups (GQA-style shared keys), values repeated to the H heads
  inside the kernel since every head keeps its own state. The recurrent state is [B, H, K, K]
  per layer (value rows, key columns) whatever the sequence length.
  """

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    del layer
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    std, pd = cfg.init_std, cfg.param_dtype
    self.cfg = cfg
    self.wq = param(rngs, (d, h, k), (EMBED, HEADS, HEAD_DIM), std=std, dtype=pd)
    self.wk = param(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), std=std, dtype=pd)
    self.wv = param(rngs, (d, g, k), (EMBED, KV_HEADS, HEAD_DIM), std=std, dtype=pd)
    if cfg.ssm.gated:
      self.w_gate = param(rngs, (d, h), (EMBED, HEADS), std=std, dtype=pd)
      self.gate_bias = nnx.Param(jnp.zeros((h,), jnp.float32), axes=(HEADS,))
    self.norm = ones((k,), (HEAD_DIM,), dtype=pd)
    self.wo = param(rngs, (h, k, d), (HEADS, HEAD_DIM, EMBED),
                    std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)

  def _project(self, x):
    """The matmuls: raw q, k, v and the gate logits (None when ungated)."""
    dt = DTYPES[self.cfg.compute_dtype]
    q = jnp.einsum("...d,dhk->...hk", x, self.wq[...].astype(dt))
    k = jnp.einsum("...d,dgk->...gk", x, self.wk[...].astype(dt))
    v = jnp.einsum("...d,dgk->...gk", x, self.wv[...].astype(dt))
    logits = None
    if self.cfg.ssm.gated:
      logits = jnp.einsum("...d,dh->...h", x, self.w_gate[...].astype(dt)).astype(jnp.float32)
    return q, k, v, logits

  def _activate(self, q, k, logits, gate_bias):
    """Element-wise: feature maps, the query scale, the log-gate."""
    dt = DTYPES[self.cfg.compute_dtype]
    fm = self.cfg.ssm.feature_map
    q, k = feature_map(q, fm), feature_map(k, fm)
    # Scores scaled like softmax attention's logits, so both start at the same magnitude.
    q = (q.astype(jnp.float32) * self.cfg.head_dim ** -0.5).astype(dt)
    log_gate = None
    if logits is not None:
      bias = gate_bias.reshape((1,) * (logits.ndim - 1) + (-1,))
      log_gate = jax.nn.log_sigmoid(logits + bias) / GATE_LOGIT_NORMALIZER
    return q, k, log_gate

  def _gate_bias(self):
    return self.gate_bias[...] if self.cfg.ssm.gated else None  # None: ungated

  def _qkv(self, x):
    q, k, v, logits = self._project(x)
    q, k, log_gate = self._activate(q, k, logits, self._gate_bias())
    return q, k, v, log_gate

  def _output(self, o, norm, wo):
    dt = DTYPES[self.cfg.compute_dtype]
    o32 = o.astype(jnp.float32)
    o32 = o32 * jax.lax.rsqrt(jnp.mean(jnp.square(o32), -1, keepdims=True) + NORM_EPS)
    o = (o32 * norm.astype(jnp.float32).reshape((1,) * (o.ndim - 1) + (-1,)))
    return jnp.einsum("...hk,hkd->...d", o.astype(dt), wo.astype(dt))

  def __call__(self, x: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
               *, return_state: bool = False, state: dict[str, jax.Array] | None = None):
    """Parallel (chunked) form; with return_state also the decode state after the last token.
    state: a decode state the sequence continues from (chunked prefill), else zeros.

    Memory: the backward pass keeps x, the projections' outputs and the kernel's named results
    (`memx.kernels.save_kernel_results`: its output and chunk-entry states); the feature maps,
    the gate, the output norm and the out-projection's input are recomputed (`jax.checkpoint`
    over `core`, as in Mamba2): no matmul and no kernel forward runs twice (under sequence
    parallelism, the state exchange and the small einsum that reads the incoming state do).
    """
    blocks = BlockSizes(chunk=self.cfg.ssm.chunk_size)
    if state is not None:
      check_state("LinearAttention", state, lambda: self.init_cache(x.shape[0]))
    h0 = None if state is None else state["state"]
    state_axes = (BATCH, HEADS, HEAD_DIM, HEAD_DIM)

    def mix(shard, q, k, v, log_gate, seg, h0):
      o, final = shard.linear_attention(q, k, v, log_gate=log_gate, segment_ids=seg,
                                        implementation=self.cfg.ssm.impl, block_sizes=blocks,
                                        final_state=return_state, initial_state=h0)
      return (o, final) if return_state else o

    qs, ks = (BATCH, SEQ, HEADS, HEAD_DIM), (BATCH, SEQ, KV_HEADS, HEAD_DIM)

    def core(q, k, v, logits, segment_ids, h0, gate_bias, norm, wo):
      q, k, log_gate = self._activate(q, k, logits, gate_bias)
      out = sequence_map(mix, q, k, v, log_gate, segment_ids, h0,
                         in_axes=(qs, ks, ks, (BATCH, SEQ, HEADS), (BATCH, SEQ), state_axes),
                         out_axes=(qs, state_axes) if return_state else qs)
      o, final = out if return_state else (out, None)
      return self._output(o, norm, wo), final

    out, final = jax.checkpoint(core, policy=save_kernel_results)(
        *self._project(x), segment_ids, h0, self._gate_bias(), self.norm[...], self.wo[...])
    return (out, {"state": final}) if return_state else out

  def init_cache(self, batch: int) -> dict[str, jax.Array]:
    h, k = self.cfg.n_heads, self.cfg.head_dim
    return {"state": jnp.zeros((batch, h, k, k), jnp.float32)}

  def _recur(self, state, q, k, v, log_gate):
    """The token-by-token part of a step: the state update and its read-out."""
    v = jnp.repeat(v, q.shape[1] // v.shape[1], axis=1)
    if log_gate is None:
      log_gate = jnp.zeros(q.shape[:2], jnp.float32)
    return ssd_step(state, v, jnp.ones(q.shape[:2], jnp.float32), log_gate, k, q)

  def step(self, x_t: Float[Array, "B D"], cache: dict[str, jax.Array]):
    """Recurrent form for one token: (y_t [B, D], new cache)."""
    o, state = self._recur(cache["state"], *self._qkv(x_t))
    return self._output(o, self.norm[...], self.wo[...]), {"state": state}

  def steps(self, x: Float[Array, "B C D"], cache: dict[str, jax.Array]):
    """`step` over C tokens → (y [B, C, D], the state after each token, [C, ...]): the
    projections and the output on the C tokens at once, the state update token by token."""
    q, k, v, log_gate = self._qkv(x)
    inputs = tuple(None if a is None else jnp.swapaxes(a, 0, 1) for a in (q, k, v, log_gate))

    def body(state, inp):
      o, state = self._recur(state, *inp)
      return state, (o, state)

    _, (outs, states) = jax.lax.scan(body, cache["state"], inputs)
    return self._output(jnp.swapaxes(outs, 0, 1), self.norm[...], self.wo[...]), {"state": states}
