"""Short causal depthwise convolution over time (Mamba's conv1d), parallel and one-step forms."""

import jax
import jax.numpy as jnp

from memx.typing import Array, Float, Int


def causal_conv(x: Float[Array, "B T ..."], w: Float[Array, "W ..."], bias: Float[Array, "..."],
                segment_ids: Int[Array, "B T"] | None = None,
                history: Float[Array, "B Wm1 ..."] | None = None,
                history_segment_ids: Int[Array, "B Wm1"] | None = None) -> Float[Array, "B T ..."]:
  """y_t = bias + Σ_{k<W} w[k] ⊙ x_{t-W+1+k}, reading `history` (the W-1 inputs before the
  sequence) before it, or zeros.

  Per channel (depthwise), computed in float32, output in x.dtype. With packed segment ids a
  token never sees inputs from an earlier segment, so packed runs equal separate ones; history
  rows belong to `history_segment_ids` (default: the first token's segment).

  One extended copy [history, x] is made and the taps are slices of it, fused into one pass.
  (Shifting each tap on its own instead made XLA:CPU materialise W-1 shifted copies, measured.)
  """
  width, t = w.shape[0], x.shape[1]
  keep = width - 1
  if history is None:
    history = jnp.zeros((x.shape[0], keep) + x.shape[2:], jnp.float32)
    history_segment_ids = None if segment_ids is None else jnp.full((x.shape[0], keep), -1,
                                                                     segment_ids.dtype)
  xp = jnp.concatenate([history.astype(jnp.float32), x.astype(jnp.float32)], axis=1)
  if segment_ids is not None:
    if history_segment_ids is None:
      history_segment_ids = jnp.broadcast_to(segment_ids[:, :1], (x.shape[0], keep))
    seg = jnp.concatenate([history_segment_ids.astype(segment_ids.dtype), segment_ids], axis=1)
  y = bias.astype(jnp.float32)[None, None]
  for k in range(width):
    xs = xp[:, k:k + t]                                    # x_{t - (W-1-k)}
    if segment_ids is not None and k < keep:
      same = seg[:, k:k + t] == segment_ids
      xs = jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), xs, 0.0)
    y = y + w[k].astype(jnp.float32)[None, None] * xs
  return jnp.broadcast_to(y, x.shape).astype(x.dtype)


def conv_step(state: Float[Array, "B Wm1 ..."], x_t: Float[Array, "B ..."],
              w: Float[Array, "W ..."], bias: Float[Array, "..."]):
  """One decoding step: state holds the last W-1 inputs. Returns (y_t in x_t.dtype, new state)."""
  # x_t is usually a fresh M=1 projection, which XLA:GPU strength-reduces to multiply+reduce.
  # Left free, it fused that reduction into the concatenate below as a loop that summed each
  # output serially: 3.6 of a 4.8 ms Mamba-2 decode step (H200, jax 0.11.2, profile_model.py).
  # The barrier keeps the projection its own (parallel) reduction kernel.
  x_t = jax.lax.optimization_barrier(x_t)
  window = jnp.concatenate([state.astype(jnp.float32), x_t.astype(jnp.float32)[:, None]], axis=1)
  y = jnp.sum(window * w.astype(jnp.float32)[None], axis=1) + bias.astype(jnp.float32)[None]
  return y.astype(x_t.dtype), window[:, 1:].astype(state.dtype)


def conv_state(x: Float[Array, "B T ..."], width: int) -> Float[Array, "B Wm1 ..."]:
  """The last W-1 inputs of a sequence (zeros in front when T < W-1): the decode state."""
  keep = width - 1
  if keep == 0:
    return x[:, :0]
  pad = ((0, 0), (max(0, keep - x.shape[1]), 0)) + ((0, 0),) * (x.ndim - 2)
  return jnp.pad(x, pad)[:, -keep:]


def last_inputs(shard, x: Float[Array, "B T ..."], history, keep: int):
  """The conv state after x on `shard` (a `memx.parallel.sequence_scan.SeqShard`): its last
  `keep` inputs, reaching back into `history` (the state x continued from, or None for zeros)
  when x is shorter. A sharded sequence holds at least `keep` tokens per device (with_history
  requires it), so only the unsharded path ever reaches into history."""
  if history is None or x.shape[1] >= keep:
    return shard.last_tokens(x, keep)
  return jnp.concatenate([history.astype(x.dtype), x], axis=1)[:, -keep:]
