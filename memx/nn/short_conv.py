"""Short causal depthwise convolution over time (Mamba's conv1d): the decode-time helpers.

The parallel form is the kernel `memx.kernels.short_conv.causal_conv`; this module holds the
one-step form and the decode state it carries.
"""

import jax
import jax.numpy as jnp

from memx.kernels.short_conv.reference import activate
from memx.typing import Array, Float


def conv_step(state: Float[Array, "B Wm1 ..."], x_t: Float[Array, "B ..."],
              w: Float[Array, "W ..."], bias: Float[Array, "..."],
              activation: str | None = None):
  """One decoding step: state holds the last W-1 inputs. Returns (y_t in x_t.dtype, new state).

  The activation runs in float32 before the output is rounded, as in the parallel kernel.
  """
  # x_t is usually a fresh M=1 projection, which XLA:GPU strength-reduces to multiply+reduce.
  # Left free, it fused that reduction into the concatenate below as a loop that summed each
  # output serially: 3.6 of a 4.8 ms Mamba-2 decode step (H200, jax 0.11.2, profile_model.py).
  # The barrier keeps the projection its own (parallel) reduction kernel.
  x_t = jax.lax.optimization_barrier(x_t)
  window = jnp.concatenate([state.astype(jnp.float32), x_t.astype(jnp.float32)[:, None]], axis=1)
  y = jnp.sum(window * w.astype(jnp.float32)[None], axis=1) + bias.astype(jnp.float32)[None]
  return activate(y, activation).astype(x_t.dtype), window[:, 1:].astype(state.dtype)


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
